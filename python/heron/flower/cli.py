"""`heron flower`: heron train's options, run as a Flower simulation; the same table and JSON report.

Imports only the standard library at module level, so building heron's argument parser does not
import flwr.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Flower-only options (heron train's options are added by heron.cli.main)."""
    parser.add_argument("--round-timeout", dest="round_timeout", type=float, default=None,
                        help="seconds to wait for a round's replies; late clients are left out (default: "
                             "heron.flower.config.ROUND_TIMEOUT, 600)")
    parser.add_argument("--ray-cpus", dest="ray_cpus", type=int, default=None,
                        help="CPUs of the Ray cluster (default: all, at most 2)")
    parser.add_argument("--client-cpus", dest="client_cpus", type=float, default=1.0,
                        help="CPUs per simulated client (clients at once = ray cpus // client cpus)")
    parser.add_argument("--client-gpus", dest="client_gpus", type=float, default=0.0,
                        help="GPU fraction per simulated client (with --device cuda)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, fields

    from heron.cli.train import client_uploads
    from heron.flower.config import FlowerSettings, check_flower_method
    from heron.flower.report import flower_report
    from heron.flower.server import describe
    from heron.flower.simulation import simulate
    from heron.sfl.config import TrainConfig
    from heron.sfl.report import format_table, plot, write_json

    methods = [m.strip() for m in (args.compare or args.method).split(",") if m.strip()]
    try:
        for method in methods:
            check_flower_method(method)
    except ValueError as error:
        print(f"heron flower: {error}", file=sys.stderr)
        return 2
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    upload_of = client_uploads(methods, values["client_upload"], bool(args.compare))
    base = TrainConfig(**{**values, "method": methods[0], "client_upload": upload_of[methods[0]]}).validate()
    timeout = {} if args.round_timeout is None else {"round_timeout": args.round_timeout}
    settings = FlowerSettings(**timeout).validate()
    runs = []
    for method in methods:
        def on_round(record, method=method):
            print(f"{method} round {record.round}: test acc {record.test_accuracy:.4f} ({record.seconds:.1f} s)",
                  flush=True)

        config = TrainConfig(**{**asdict(base), "method": method, "client_upload": upload_of[method]})
        runs.append(simulate(config, settings, ray_cpus=args.ray_cpus, client_cpus=args.client_cpus,
                             client_gpus=args.client_gpus, on_round=None if args.no_progress else on_round,
                             verbose=args.verbose))
    print(format_table([run.report for run in runs]))
    for run in runs:
        for outcome in run.outcomes:
            for entry in outcome.left_out:
                print(f"{run.config.method} round {outcome.round}: {describe(entry)} left out: {entry.reason}")
    if args.report:
        write_json(args.report, flower_report(runs))
        print(f"wrote {args.report}")
    if args.plot:
        plot(args.plot, [run.report for run in runs])
        print(f"wrote {args.plot}")
    return 0
