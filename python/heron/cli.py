"""heron's command line: `heron <command>` or `python -m heron <command>`."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _environment() -> dict:
    from heron import backends

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_backends": backends.available("cpu"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _cmd_run(args: argparse.Namespace) -> int:
    from heron.demo import run_demo

    results = run_demo(zo_steps=args.zo_steps, fo_steps=args.fo_steps, seed=args.seed)
    if args.json:
        report = {"environment": _environment(), "results": [r.__dict__ for r in results]}
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from heron.configs import build_config, build_updater
    from heron.profile import profile_step

    kinds = [k.strip() for k in args.updaters.split(",") if k.strip()]
    overrides = {} if args.backend is None else {"backend": args.backend}
    config_kwargs = {"device": args.device}
    if args.batch is not None:
        config_kwargs["batch_size"] = args.batch
    config = build_config(args.model, **config_kwargs)
    print(f"{config.name}: {config.description} on {args.device}")
    results = {}
    for kind in kinds:
        updater = build_updater(kind, config, **(overrides if kind == "zo" else {}))
        print(f"  profiling {kind} ...", flush=True)
        results[kind] = profile_step(updater, config.batch, warmup=args.warmup, repeats=args.repeats).as_dict()
        del updater
    print(f"{'updater':<8} {'peak memory MB':>15} {'GFLOPs/step':>12} {'time s':>8}")
    for kind, r in results.items():
        print(f"{kind:<8} {r['peak_memory_bytes'] / 1e6:15.1f} {r['flops'] / 1e9:12.2f} {r['time_s']:8.3f}")
    if "zo" in results:
        for kind in results:
            if kind != "zo":
                zo, other = results["zo"], results[kind]
                print(f"zo/{kind}: memory {zo['peak_memory_bytes'] / other['peak_memory_bytes']:.3f}, "
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heron", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the main job: a zeroth-order vs first-order training run on "
                                          "scikit-learn's digits (no downloads)")
    run.add_argument("--zo-steps", type=int, default=3000)
    run.add_argument("--fo-steps", type=int, default=300)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", help="write the results to this JSON file")
    run.set_defaults(handler=_cmd_run)

    prof = commands.add_parser("profile", help="peak memory, FLOPs and time of one client step, updaters side by side")
    prof.add_argument("--model", required=True, choices=["resnet18-paper", "gpt2m-paper"])
    prof.add_argument("--updaters", default="zo,fo,mezo", help="comma-separated from zo, fo, mezo")
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
