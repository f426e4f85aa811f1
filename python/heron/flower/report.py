"""What a Flower run leaves (FlowerRun) and its JSON report: `heron train`'s format plus a "flower" section."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from heron.flower.config import FlowerSettings
from heron.flower.server import RoundOutcome
from heron.profiling.environment import environment as heron_environment
from heron.sfl.config import TrainConfig
from heron.sfl.records import MethodReport
from heron.sfl.report import report_dict, write_json


@dataclass
class FlowerRun:
    """What a run leaves: the engine's report, the final client (client part + aux head) and server
    parameters, and each round's aggregated and left-out clients. status "failed": the run stopped
    with `error` after the rounds it reports."""

    config: TrainConfig
    settings: FlowerSettings
    report: MethodReport
    client_state: dict[str, torch.Tensor]
    server_state: dict[str, torch.Tensor]
    outcomes: list[RoundOutcome]
    status: str = "completed"
    error: str | None = None

    def flower_summary(self) -> dict:
        """The Flower-specific part of a JSON report: settings, status (and error) and per-round outcomes."""
        error = {} if self.error is None else {"error": self.error}
        return {"settings": asdict(self.settings), "status": self.status, **error,
                "rounds": [asdict(o) for o in self.outcomes]}


def environment() -> dict[str, Any]:
    """heron train's environment block plus the Flower version."""
    import flwr

    return {**heron_environment(), "flwr": flwr.__version__}


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
