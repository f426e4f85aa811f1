"""Markdown tables of the benchmarks, from their JSON results (bench/results), so the tables in
bench/README.md and the README are printed from the measurements rather than copied by hand.

    .venv/bin/python bench/tables.py bench/results/linear_cpu.json bench/results/updates_cpu.json \
        bench/results/stream_cpu.json
    .venv/bin/python bench/tables.py --any-model bench/results/profile_any_model_cpu.json \
        bench/results/profile_any_model_cpu_jemalloc.json

The kernel tables take their rows (`stream`, `updates`, `linear` files); `--any-model` takes the
reports of bench/profile_any_model.py, the first one's times and memory, and each one's ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else data["rows"]


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def _cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(row[key]) if key in row else "-"


def linear_table(rows: list[dict]) -> list[str]:
    lines = ["| op | M | K=N | r | path | fused / two GEMMs (median) | (fastest) | generate Z / two GEMMs | "
             "unfused / fused | fused extra MiB | unfused extra MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unfused_mib = _mib(r["unfused_extra_bytes"]) if "unfused_extra_bytes" in r else "-"
        lines.append(f"| {r['op']} | {r['m']} | {r['k']} | {r.get('rank', '-')} | {r['path']} | "
                     f"{r['fused_over_floor']:.2f} | {_cell(r, 'fastest_fused_over_floor')} | "
                     f"{_cell(r, 'generate_over_floor')} | {r['unfused_over_fused']:.2f} | "
                     f"{_mib(r['fused_extra_bytes'])} | {unfused_mib} |")
    return lines


def updates_table(rows: list[dict]) -> list[str]:
    lines = ["| op | elements | fused / p.add_(q) (median) | (fastest) | generate / p.add_(q) (median) | "
             "unfused / fused | fused extra bytes | unfused extra MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['n']} | {r['fused_over_add']:.2f} | {r['fastest_fused_over_add']:.2f} | "
                     f"{r['generate_over_add']:.2f} | {r['unfused_over_fused']:.2f} | {r['fused_extra_bytes']} | "
                     f"{r['unfused_extra_bytes'] >> 20} |")
    return lines


def stream_table(rows: list[dict]) -> list[str]:
    lines = ["| backend | threads | normals/s (median) | vs torch.randn (median) | (fastest) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['threads']} | {r['normals_per_s'] / 1e6:.0f} M/s | "
                     f"{r['vs_torch_randn']:.2f} | {r['fastest_vs_torch_randn']:.2f} |")
    return lines


def table(path: Path) -> list[str]:
    rows = _rows(path)
    if not rows:
        return []
    if "normals_per_s" in rows[0]:
        return stream_table(rows)
    if "fused_over_add" in rows[0]:
        return updates_table(rows)
    return linear_table(rows)


_UPDATERS = ("zo", "zo-seq", "zo-inplace", "mezo", "fo")
_ZO = ("zo", "zo-seq", "zo-inplace")


def _allocator(report: dict) -> str:
    allocator = report["environment"]["allocator"]
    return "jemalloc" if "jemalloc" in str(allocator) else "glibc"


def any_model_table(reports: list[dict]) -> list[str]:
    """Time and peak memory per step (the first report) and MeZO time / ZO time (every report),
    one row per model."""
    ratios = " | ".join(f"MeZO / ZO, {_allocator(r)} ({' / '.join(_ZO)})" for r in reports)
    lines = [f"| model | trainable | executor | {' | '.join(k + ' s' for k in _UPDATERS)} | peak MB "
             f"{' / '.join(_UPDATERS)} | {ratios} |", "|---" * (4 + len(_UPDATERS) + len(reports)) + "|"]
    for name, model in reports[0]["models"].items():
        u = model["updaters"]
        cells = [f"{u[k]['time_s']:.3f}" for k in _UPDATERS]
        memory = " / ".join(f"{u[k]['peak_memory_bytes'] / 1e6:.0f}" for k in _UPDATERS)
        ratio_cells = []
        for report in reports:
            v = report["models"][name]["updaters"]
            ratio_cells.append(" / ".join(f"{v['mezo']['time_s'] / v[k]['time_s']:.2f}" for k in _ZO))
        lines.append(f"| {model.get('description', name)} | {model['trainable_parameters']:,} | {model['executor']} | "
                     f"{' | '.join(cells)} | {memory} | {' | '.join(ratio_cells)} |")
    return lines


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    if argv[0] == "--any-model":
        print("\n".join(any_model_table([json.loads(Path(name).read_text()) for name in argv[1:]])))
        return 0
    for name in argv:
        print("\n".join(table(Path(name))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
