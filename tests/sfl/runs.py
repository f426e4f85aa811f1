"""Shared helpers of the engine tests: a run's parameters, and a run killed after a round and resumed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heron.sfl.config import TrainConfig
from heron.sfl.engine import Experiment
from heron.sfl.records import MethodReport


def run_parameters(experiment: Experiment) -> dict[str, torch.Tensor]:
    """Every tensor of the run's global client model and server part, keyed client.* / server.*."""
    return {**{f"client.{k}": v for k, v in experiment.client_parameters().items()},
            **{f"server.{k}": v.detach().clone() for k, v in experiment.server_model.state_dict().items()}}


class Killed(RuntimeError):
    pass


def assert_resume_equals_uninterrupted(config: TrainConfig, directory: Path) -> tuple[Experiment, Experiment]:
    """Run `config` uninterrupted, and again killed after round 2 and resumed; assert the resumed run
    restarts at round 2, reports every round, and ends with bit-identical parameters. Returns
    (uninterrupted, resumed) for further checks."""
    full = Experiment(config, checkpoint_dir=directory / "full")
    full.run()
    resumed, report = kill_and_resume(config, directory / "killed", kill_after=2)
    assert resumed.start_round == 2 and [r.round for r in report.rounds] == list(range(1, config.rounds + 1))
    for key, value in run_parameters(full).items():
        assert torch.equal(value, run_parameters(resumed)[key]), key
    return full, resumed


def kill_and_resume(config: TrainConfig, directory: Path, *, kill_after: int) -> tuple[Experiment, MethodReport]:
    """Run `config` with checkpoints in `directory`, killed right after round `kill_after`; then resume
    it to the end. Returns the resumed experiment and its report."""

    def kill(record) -> None:
        if record.round == kill_after:
            raise Killed

    with pytest.raises(Killed):
        Experiment(config, checkpoint_dir=directory).run(on_round=kill)
    resumed = Experiment(config, checkpoint_dir=directory, resume=True)
    return resumed, resumed.run()
