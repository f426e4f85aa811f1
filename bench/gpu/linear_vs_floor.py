"""GPU benchmark of the linear ops against the floor, side by side in one run (issue 13's "Must show").

For each (M, K=N) shape, dtype and input mode it times, interleaved (bench/timing.median_times):
  floor        two cuBLAS F.linear calls (x @ W.T + b, x_pert @ W.T + b)
  materialise  Z and z_b by heron.seeded_randn, then W + mu Z and two cuBLAS F.linear calls
  heron-<b>    heron.kernels.functional with backend b pinned (the chunked route on CUDA tensors)
and records each time over the floor, plus the scratch each heron call takes (peak allocated less
the outputs; heron.profiling.memory.peak_memory) against perturbed_linear_scratch_bytes.
LoRA (r = 4, 8, 16) and low rank (r = 8) likewise against the floor.

  python bench/gpu/linear_vs_floor.py --out results.json           # on a GPU
  python bench/gpu/linear_vs_floor.py --out results.json --dry-run  # CPU, tiny shapes, the "cpu" backend
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import heron  # noqa: E402
from bench.timing import median_times  # noqa: E402
from heron.kernels import functional as HF  # noqa: E402
from heron.profiling.memory import peak_memory  # noqa: E402

SEED, MU = 1234, 1e-3
GPU_SHAPES = [(4096, 4096), (4096, 1024), (8192, 768), (256, 4096)]  # (M, K = N)
DRY_SHAPES = [(64, 96), (16, 130)]


def _operands(m: int, k: int, device: str, dtype: torch.dtype, shared: bool):
    x = torch.randn(m, k, device=device, dtype=dtype)
    x_pert = None if shared else torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(k, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(k, device=device, dtype=dtype)
    return x, x_pert, w, b


def full_rank_rows(device: str, dtype: torch.dtype, shapes, backends, rounds: int) -> list[dict]:
    rows = []
    for m, k in shapes:
        for shared in (False, True):
            x, x_pert, w, b = _operands(m, k, device, dtype, shared)
            xp = x if x_pert is None else x_pert

            def floor(x=x, xp=xp, w=w, b=b):
                return torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(xp, w, b)

            def materialise(x=x, xp=xp, w=w, b=b, k=k):
                z = heron.seeded_randn((k, k), SEED, 0, device=device, dtype=dtype)
                z_b = heron.seeded_randn(k, SEED, k * k, device=device, dtype=dtype)
                return torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(xp, w + MU * z, b + MU * z_b)

            heron_calls = {f"heron-{name}": (lambda x=x, x_pert=x_pert, w=w, b=b, name=name: HF.perturbed_linear(
                x, w, b, seed=SEED, mu=MU, x_pert=x_pert, backend=name)) for name in backends}
            names = ["floor", "materialise", *heron_calls]
            times = dict(zip(names, median_times([floor, materialise, *heron_calls.values()], device, rounds),
                             strict=True))
            out_bytes = 2 * m * k * x.element_size()
            for name, call in heron_calls.items():
                rows.append({"op": "perturbed_linear", "path": "shared-input" if shared else "two-inputs",
                             "impl": name, "dtype": str(dtype).removeprefix("torch."), "m": m, "k": k, "n": k,
                             "seconds": times[name], "floor_seconds": times["floor"],
                             "over_floor": times[name] / times["floor"],
                             "materialise_over_floor": times["materialise"] / times["floor"],
                             "scratch_bytes": peak_memory(call, device)[1] - out_bytes,
                             "planned_scratch_bytes": HF.perturbed_linear_scratch_bytes(w)})
    return rows


def low_rank_rows(device: str, dtype: torch.dtype, shapes, backends, rounds: int) -> list[dict]:
    rows = []
    for m, k in shapes:
        x, x_pert, w, b = _operands(m, k, device, dtype, shared=False)

        def floor(x=x, x_pert=x_pert, w=w, b=b):
            return torch.nn.functional.linear(x, w, b), torch.nn.functional.linear(x_pert, w, b)

        calls = {}
        for rank in (4, 8, 16):
            a = torch.randn(rank, k, device=device, dtype=dtype) / k**0.5
            bb = torch.randn(k, rank, device=device, dtype=dtype) / rank**0.5
            for name in backends:
                calls[("lora", rank, name)] = (lambda x=x, x_pert=x_pert, w=w, b=b, a=a, bb=bb, name=name:
                                               HF.lora_perturbed_linear(x, w, b, a, bb, scale=0.5, seed=SEED, mu=MU,
                                                                        x_pert=x_pert, backend=name))
        for name in backends:
            calls[("lowrank", 8, name)] = (lambda x=x, x_pert=x_pert, w=w, b=b, name=name: HF.lowrank_perturbed_linear(
                x, w, b, seed=SEED, rank=8, mu=MU, x_pert=x_pert, backend=name))
        times = median_times([floor, *calls.values()], device, rounds)
        out_bytes = 2 * m * k * x.element_size()
        for (op, rank, name), seconds in zip(calls, times[1:], strict=True):
            rows.append({"op": f"{op}_perturbed_linear", "path": "two-inputs", "impl": f"heron-{name}", "rank": rank,
                         "dtype": str(dtype).removeprefix("torch."), "m": m, "k": k, "n": k, "seconds": seconds,
                         "floor_seconds": times[0], "over_floor": seconds / times[0],
                         "scratch_bytes": peak_memory(calls[(op, rank, name)], device)[1] - out_bytes})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'op':<26}{'path':<14}{'impl':<14}{'dtype':<10}{'M':>6}{'K=N':>6}{'r':>4}{'x floor':>9}"
             f"{'mat/floor':>10}{'scratch MiB':>12}"]
    for row in rows:
        lines.append(f"{row['op']:<26}{row['path']:<14}{row['impl']:<14}{row['dtype']:<10}{row['m']:>6}{row['k']:>6}"
                     f"{row.get('rank', ''):>4}{row['over_floor']:>9.2f}"
                     f"{row.get('materialise_over_floor', float('nan')):>10.2f}{row['scratch_bytes'] / 2**20:>12.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the cpu backend")
    args = parser.parse_args()
    if args.dry_run:
        device, shapes, backends, rounds, dtypes = "cpu", DRY_SHAPES, ["cpu"], 3, [torch.float32]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --dry-run")
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 compared as float32 (TF32 off)
        device, shapes, backends, rounds, dtypes = "cuda", GPU_SHAPES, ["triton", "cuda"], 20, [torch.bfloat16,
                                                                                               torch.float32]
        backends = [b for b in backends if heron.kernels.backends.unavailable_reason(b, "cuda") is None]
    rows = []
    for dtype in dtypes:
        rows += full_rank_rows(device, dtype, shapes, backends, rounds)
        rows += low_rank_rows(device, dtype, shapes, backends, rounds)
    environment = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else
                   platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "scratch_budget": heron.kernels.chunked.get_scratch_budget(), "dry_run": args.dry_run}
    args.out.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
