"""The configuration of a HERON-SFL run (TrainConfig) and its one identity rule: whether a saved
state (a checkpoint, a Flower node's updater state) belongs to this run.

Every command builds its runs from a TrainConfig (heron train, heron flower, the Flower app's run
config); the engine's checkpoints and the Flower nodes store `config.identity()` and continue only
from a state whose identity equals theirs (`identity_differences` says what differs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from heron.sfl.data import DATASET_KINDS
from heron.sfl.methods import check_method, check_model_fits
from heron.sfl.replay import check_client_upload
from heron.zo.updaters import SCHEDULES

USER_MODEL = "user"  # TrainConfig.model of a run on a model the user split (Experiment(split=...))

# Fields that may differ within one run: `rounds` (a finished run can be resumed to train further) and
# the ZO schedule (it changes how a step is executed and its rounding, not what the run computes).
NOT_IDENTITY = ("rounds", "zo_schedule")
# Options added after the first checkpoints were written, in the identity only when set (an unset value
# is what every run did before the option existed), so those checkpoints still resume.
LATER_OPTIONS = {"cut": None, "aux_layers": None, "zo_rank": 0, "client_upload": "parameters"}


@dataclass
class TrainConfig:
    """Everything a run depends on. Checkpoints and Flower nodes store its identity()."""

    method: str = "heron"
    model: str = "cnn"
    dataset: str = "mnist"
    clients: int = 5
    rounds: int = 10
    local_steps: int = 10
    upload_every: int = 1
    batch_size: int = 64
    partition: str = "iid"
    alpha: float = 0.5
    client_optimizer: str = "adam"
    client_lr: float = 1e-3
    zo_lr: float = 1e-3
    mu: float = 1e-3
    q: int = 1
    server_optimizer: str = "adam"
    server_lr: float = 1e-3
    weighting: str = "samples"
    seed: int = 0
    device: str = "cpu"
    backend: str | None = None
    client_upload: str = "parameters"  # "seeds": ZO clients upload seed-and-scalar records (heron.sfl.replay)
    zo_schedule: str = "dual"  # ZOUpdater schedule: "dual" (fused streams) or "sequential" (half the activations)
    zo_rank: int = 0  # > 0: rank-r ZO directions on Linear/Conv2d weights (perturbation="lowrank"); 0: full

    cut: int | None = None  # split point / auxiliary-head depth of gpt2* and minilm (None: the model's default)
    aux_layers: int | None = None

    def validate(self) -> TrainConfig:
        check_method(self.method)
        check_client_upload(self.method, self.client_upload)
        if self.zo_schedule not in SCHEDULES:
            raise ValueError(f"zo_schedule must be one of {', '.join(SCHEDULES)}, got {self.zo_schedule!r}")
        if self.zo_rank < 0:
            raise ValueError(f"zo_rank must be >= 0 (0: full directions), got {self.zo_rank}")
        if self.dataset in DATASET_KINDS and self.model != USER_MODEL:  # user datasets: checked when it is built
            check_model_fits(self.model, DATASET_KINDS[self.dataset], self.dataset)
        for name in ("clients", "rounds", "local_steps", "upload_every", "batch_size", "q"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    def identity(self) -> dict[str, Any]:
        """What makes a run this run: every field but NOT_IDENTITY, and the LATER_OPTIONS only when set.
        Two configs are the same run exactly when their identities are equal."""
        return {key: value for key, value in asdict(self).items()
                if key not in NOT_IDENTITY and not (key in LATER_OPTIONS and value == LATER_OPTIONS[key])}


def identity_differences(stored: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """How a stored identity differs from config's (empty: the same run), one phrase per field."""
    expected = config.identity()
    differences = []
    for key in sorted(stored.keys() | expected.keys()):
        saved = stored.get(key, LATER_OPTIONS.get(key, "(absent)"))
        wanted = expected.get(key, LATER_OPTIONS.get(key, "(absent)"))
        if saved != wanted:
            differences.append(f"{key} is {saved!r} there, {wanted!r} in this run")
    return differences
