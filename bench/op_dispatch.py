"""What one heron op call costs beyond its kernel, on a tensor small enough that the kernel is nothing.

`perturb_` on a 96-element CPU tensor, three ways, timed interleaved in rotating rounds (wall time,
one thread, medians): the functional API (`heron.kernels.functional.perturb_`: argument checks, then
the op), the op through the dispatcher (`torch.ops.heron.perturb_`), and the C++ launcher called
directly; `p.add_(q)` of the same tensor as the floor of any torch call.

    .venv/bin/python bench/op_dispatch.py --json bench/results/op_dispatch_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import heron  # noqa: F401 - registers torch.ops.heron
from heron.kernels import functional as HF
from heron.kernels.launchers import LAUNCHERS
from heron.profiling.environment import environment
from heron.profiling.profile import round_order

CALLS_PER_SAMPLE = 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    param, other = torch.randn(96), torch.randn(96)
    launcher = LAUNCHERS["perturb_"]["cpu"]
    fns = {
        "functional perturb_": lambda: HF.perturb_(param, 5, alpha=1e-3, offset=7, backend="cpu"),
        "torch.ops.heron.perturb_": lambda: torch.ops.heron.perturb_(param=param, seed=5, offset=7, alpha=1e-3,
                                                                     backend="cpu"),
        "launcher (C++ direct)": lambda: launcher(param=param, seed=5, offset=7, alpha=1e-3),
        "p.add_(q)": lambda: param.add_(other),
    }
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for round_ in range(args.rounds):
            for index in round_order(len(names), round_):
                fn = fns[names[index]]
                start = time.perf_counter()
                for _ in range(CALLS_PER_SAMPLE):
                    fn()
                samples[names[index]].append((time.perf_counter() - start) / CALLS_PER_SAMPLE)
    per_call = {name: statistics.median(s) for name, s in samples.items()}
    for name, seconds in per_call.items():
        print(f"{name:<26} {seconds * 1e6:7.2f} us per call")
    if args.json:
        report = {"per_call_s": per_call, "rounds": args.rounds, "calls_per_sample": CALLS_PER_SAMPLE,
                  "environment": environment()}
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
