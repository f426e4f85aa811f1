"""The JSON report of Flower runs: `heron train`'s format plus a "flower" section."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from heron.flower.server_app import FlowerRun
from heron.sfl.report import report_dict, write_json


def environment() -> dict[str, Any]:
    """heron train's environment block plus the Flower version."""
    import flwr

    from heron.cli import _environment

    return {**_environment(), "flwr": flwr.__version__}


def flower_report(runs: list[FlowerRun]) -> dict[str, Any]:
    """{"status", "config", "environment", "methods"} (heron train's report, and "completed" or "failed"), with
    "error" when a run failed, and "flower": {method: {"settings", "status", "rounds": [{"round",
    "aggregated", "left_out"}]}}."""
    methods = [run.config.method for run in runs]
    report = report_dict(asdict(runs[0].config) | {"methods": methods}, environment(), [run.report for run in runs])
    errors = [run.error for run in runs if run.status != "completed"]
    report = {"status": "failed" if errors else "completed", **({"error": errors[0]} if errors else {}), **report}
    report["flower"] = {run.config.method: run.flower_summary() for run in runs}
    return report


def write_report(path: str | Path, runs: list[FlowerRun]) -> None:
    write_json(path, flower_report(runs))


def write_failure(path: str | Path, error: str, run_config: dict[str, Any]) -> None:
    """The report of a run that failed before its first round (e.g. a run config it refused)."""
    write_json(path, {"status": "failed", "error": error, "run_config": run_config})
