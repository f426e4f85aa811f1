"""`heron profile` under glibc's malloc and under jemalloc, side by side, as ratios.

The allocator is chosen when a process starts (LD_PRELOAD), so each run is a `heron profile`
subprocess: `--rounds` rounds, each one run per allocator, the allocators' order alternating
between rounds (so drift and other load on a shared machine fall on both). Inside a run the
updaters' timed steps are interleaved as usual. Per allocator: the median over runs of each
updater's time, and the median over runs of each run's ratios (zo / mezo, zo / fo, ...), which
compare updaters that ran side by side in one process.

jemalloc runs with decay off (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1): freed pages stay
with the process, as a caching allocator (PyTorch's on a GPU) keeps them, so a step does not pay
page faults for memory it frees and allocates again. glibc's malloc returns large blocks (above
its mmap threshold) to the OS on free.

    .venv/bin/python bench/allocators.py --model resnet18-paper --updaters zo,zo-seq,fo,mezo \
        --threads 2 --rounds 3 --json bench/results/allocators_resnet18-paper_cpu.json

The jemalloc library is the distribution's (Debian: `apt-get install libjemalloc2`), found with
`ldconfig -p` or given with --jemalloc; without it the script stops and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
ALLOCATORS = ("glibc", "jemalloc")


def find_jemalloc() -> str | None:
    """Path of the system's libjemalloc.so.2 (ldconfig's cache), or None."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in listing.splitlines():
        if "libjemalloc.so" in line and "=>" in line:
            return line.split("=>")[-1].strip()
    return None


def allocator_env(allocator: str, jemalloc: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    if allocator == "jemalloc":
        env.update(LD_PRELOAD=jemalloc, MALLOC_CONF=JEMALLOC_CONF)
    return env


def run_profile(args: argparse.Namespace, allocator: str, jemalloc: str | None) -> dict[str, Any]:
    """One `heron profile` subprocess under `allocator`; its JSON report."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "profile.json"
        command = [sys.executable, "-m", "heron", "profile", "--model", args.model, "--updaters", args.updaters,
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--json", str(path)]
        if args.batch is not None:
            command += ["--batch", str(args.batch)]
        subprocess.run(command, env=allocator_env(allocator, jemalloc), check=True, stdout=subprocess.DEVNULL)
        report = json.loads(path.read_text())
    measured = report["environment"]["allocator"]
    if measured != allocator:
        raise RuntimeError(f"asked for {allocator}, the profiled process ran {measured}")
    return report


def ratios(times: dict[str, float]) -> dict[str, float]:
    """time(zo kind) / time(other) for every zo kind against every other updater of one run."""
    zo_kinds = [k for k in times if k.startswith("zo")]
    return {f"{zo}/{other}": times[zo] / times[other] for zo in zo_kinds for other in times if other not in zo_kinds}


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over one allocator's runs: each updater's time and peak memory, each ratio."""
    kinds = list(reports[0]["updaters"])
    times = [{k: r["updaters"][k]["time_s"] for k in kinds} for r in reports]
    per_run = [ratios(t) for t in times]
    return {"time_s": {k: statistics.median(t[k] for t in times) for k in kinds},
            "peak_memory_bytes": {k: statistics.median(r["updaters"][k]["peak_memory_bytes"] for r in reports)
                                  for k in kinds},
            "time_ratios": {name: statistics.median(run[name] for run in per_run) for name in per_run[0]},
            "time_ratios_per_run": per_run, "times_per_run": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--updaters", default="zo,zo-seq,fo,mezo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--jemalloc", default=None, help="path of libjemalloc.so (default: from ldconfig -p)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    jemalloc = args.jemalloc or find_jemalloc()
    if jemalloc is None:
        print("jemalloc not found (ldconfig -p lists no libjemalloc.so): install the distribution's package "
              "(Debian: apt-get install libjemalloc2) or pass --jemalloc PATH", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in ALLOCATORS}
    for index in range(args.rounds):
        for allocator in ALLOCATORS if index % 2 == 0 else ALLOCATORS[::-1]:
            report = run_profile(args, allocator, jemalloc)
            runs[allocator].append(report)
            times = {k: round(v["time_s"], 3) for k, v in report["updaters"].items()}
            print(f"round {index + 1} {allocator}: {times}", flush=True)
    summary = {allocator: summarise(reports) for allocator, reports in runs.items()}
    kinds = list(summary["glibc"]["time_s"])
    print(f"\n{args.model}, {args.threads} threads, medians of {args.rounds} runs per allocator")
    print(f"{'updater':<10} {'glibc s':>9} {'jemalloc s':>11} {'peak MB':>9}")
    for kind in kinds:
        print(f"{kind:<10} {summary['glibc']['time_s'][kind]:9.3f} {summary['jemalloc']['time_s'][kind]:11.3f} "
              f"{summary['glibc']['peak_memory_bytes'][kind] / 1e6:9.1f}")
    for name in summary["glibc"]["time_ratios"]:
        print(f"{name:<14} glibc {summary['glibc']['time_ratios'][name]:.3f}  "
              f"jemalloc {summary['jemalloc']['time_ratios'][name]:.3f}")
    if args.json:
        environment = {a: runs[a][0]["environment"] for a in ALLOCATORS}
        result = {"model": args.model, "description": runs["glibc"][0]["config"]["description"],
                  "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "repeats": args.repeats,
                  "jemalloc": jemalloc, "jemalloc_conf": JEMALLOC_CONF, "allocators": summary,
                  "environment": environment}
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
