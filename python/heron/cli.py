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

    info = commands.add_parser("info", help="versions and the kernel backends available here")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
