"""Reports of an SFL run: the final table, the JSON report and the accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from heron.sfl.records import MethodReport


def format_table(reports: list[MethodReport]) -> str:
    """One line per method; language-modelling runs add test loss and perplexity columns."""
    lm = any(r.final_perplexity is not None for r in reports)
    metric, width = ("next-tok acc", 12) if lm else ("test acc", 8)
    header = (f"{'method':<9} {metric:>{width}} {'client peak MB':>14} {'client GFLOPs/step':>18} "
              f"{'client step s':>13} {'MB up':>9} {'MB down':>9}" + (f" {'test loss':>9} {'ppl':>8}" if lm else ""))
    lines = [header, "-" * len(header)]
    for r in reports:
        line = (f"{r.method:<9} {r.final_accuracy:{width}.4f} {r.client_peak_memory_bytes / 1e6:14.1f} "
                f"{r.client_flops_per_step / 1e9:18.3f} {r.client_step_time_s:13.3f} "
                f"{r.bytes_up / 1e6:9.1f} {r.bytes_down / 1e6:9.1f}")
        if lm:
            line += f" {_number(r.final_test_loss, 9, 4)} {_number(r.final_perplexity, 8, 2)}"
        lines.append(line)
    return "\n".join(lines)


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def report_dict(config: dict[str, Any], environment: dict[str, Any], reports: list[MethodReport]) -> dict[str, Any]:
    methods = {}
    for r in reports:
        entry = r.as_dict()
        entry.pop("method")
        methods[r.method] = entry
    return {"config": config, "environment": environment, "methods": methods}


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot(path: str | Path, reports: list[MethodReport]) -> None:
    """PNG: the test metric (accuracy, or next-token accuracy) against round and against cumulative
    bytes communicated (up + down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for r in reports:
        rounds = [rec.round for rec in r.rounds]
        accuracy = [rec.test_accuracy for rec in r.rounds]
        cumulative, total = [], 0
        for rec in r.rounds:
            total += rec.bytes_up + rec.bytes_down
            cumulative.append(total / 1e6)
        by_round.plot(rounds, accuracy, marker="o", label=r.method)
        by_bytes.plot(cumulative, accuracy, marker="o", label=r.method)
    metric = f"test {reports[0].metric}" if reports else "test accuracy"
    by_round.set(xlabel="round", ylabel=metric, title=f"{metric} vs round")
    by_bytes.set(xlabel="MB communicated (up + down)", ylabel=metric, title=f"{metric} vs communication")
    for axis in (by_round, by_bytes):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
