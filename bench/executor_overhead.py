"""The zeroth-order executors' own cost per step, where the model's ops cost next to nothing.

The ConvNeXt layer-scale pattern of tests/zo/third_party.py (dim 96, 3 blocks) on one 4x4 image:
a plain forward and loss, ZOUpdater's base pass (through the fx interpreter), its perturbed pass
(sequential schedule) and its dual pass, and whole steps of ZOUpdater (both schedules) and
MeZOUpdater, all timed interleaved in rotating rounds (wall time, one thread, medians). What a
step costs beyond its ops is what separates ZO from MeZO-style on small activation-bound models.

    .venv/bin/python bench/executor_overhead.py --json bench/results/executor_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zo.third_party

import heron  # noqa: E402
from heron.profiling.environment import environment  # noqa: E402
from heron.profiling.profile import round_order  # noqa: E402
from tests.zo import third_party as tp  # noqa: E402


def competitors() -> dict[str, callable]:
    torch.manual_seed(0)
    model = tp.TinyConvNeXt(dim=96, depth=3)
    x, y = torch.randn(1, 3, 4, 4), torch.tensor([1])
    loss_fn = torch.nn.functional.cross_entropy
    seq = heron.ZOUpdater(model, loss_fn, schedule="sequential", optimizer="adam", lr=1e-4)
    dual = heron.ZOUpdater(model, loss_fn, schedule="dual", optimizer="adam", lr=1e-4)
    mezo = heron.MeZOUpdater(model, loss_fn, optimizer="adam", lr=1e-4)
    ids = {id(p): n for n, p in model.named_parameters()}
    seq._buffers = list(model.buffers())  # what step() sets before its passes

    def run_pass(updater: heron.ZOUpdater, seed: int, scale: float, stream: str):
        # the updater's own pass (private: the step runs these and nothing else of the model)
        return lambda: updater._run((x,), {}, y, updater._perturbation(ids, seed, scale, 0, stream), keep_cut=False)

    def plain():
        loss_fn(model(x), y)

    return {"plain forward": plain, "zo base pass": run_pass(seq, 0, 0.0, "base"),
            "zo perturbed pass": run_pass(seq, 5, 1e-3, "pert"), "zo dual pass": run_pass(dual, 5, 1e-3, "dual"),
            "zo-seq step": lambda: seq.step((x, y)), "zo step": lambda: dual.step((x, y)),
            "mezo step": lambda: mezo.step((x, y))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    fns = competitors()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for round_ in range(args.rounds):
            for index in round_order(len(names), round_):
                start = time.perf_counter()
                fns[names[index]]()
                times[names[index]].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"{name:<20} {seconds * 1e3:7.2f} ms")
    if args.json:
        report = {"median_s": medians, "rounds": args.rounds, "environment": environment()}
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
