"""`heron flower`: heron train's options, run as a Flower simulation; the same table and JSON report.

Imports only the standard library at module level, so building heron's argument parser does not
import flwr.
"""

from __future__ import annotations

import argparse


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
    from heron.cli import UsageError
    from heron.cli.train import checked_configs
    from heron.flower.config import FlowerSettings, check_flower_method
    from heron.flower.report import flower_report
    from heron.flower.server import describe
    from heron.flower.simulation import simulate
    from heron.sfl.report import format_table, plot, write_json

    configs = checked_configs(args, check_flower_method)
    timeout = {} if args.round_timeout is None else {"round_timeout": args.round_timeout}
    try:
        settings = FlowerSettings(**timeout).validate()
    except ValueError as error:
        raise UsageError(str(error)) from None
    runs = []
    for config in configs:
        method = config.method

        def on_round(record, method=method):
            print(f"{method} round {record.round}: test acc {record.test_accuracy:.4f} ({record.seconds:.1f} s)",
                  flush=True)

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
