"""The configuration of a HERON-SFL run (TrainConfig) and its one identity rule: whether a saved
state (a checkpoint, a Flower node's updater state) belongs to this run.

Every command builds its runs from a TrainConfig (heron train, heron flower, the Flower app's run
config); the engine's checkpoints and the Flower nodes store `config.identity()` and continue only
from a state whose identity equals theirs (`identity_differences` says what differs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from heron.kernels import backends
from heron.kernels.functional import check_scalar
from heron.kernels.stream import SEED_LIMIT, check_int
from heron.sfl.data import DATASET_KINDS
from heron.sfl.methods import check_method, check_model_fits
from heron.sfl.replay import check_client_upload
from heron.zo.updaters import SCHEDULES

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
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
    zo_rank: int = 0  # > 0: rank-r ZO directions on Linear/Conv1D/Conv2d weights (perturbation="lowrank"); 0: full

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
        if self.upload_every > self.local_steps:
            raise ValueError(f"upload_every must be <= local_steps (clients upload every upload_every local steps: "
                             f"with more, no client ever uploads and the server never trains), got upload_every="
                             f"{self.upload_every}, local_steps={self.local_steps}")
        check_scalar(self.mu, "mu", nonzero=True)
        for name in ("alpha", "client_lr", "zo_lr", "server_lr"):
            if check_scalar(getattr(self, name), name) <= 0:
                meaning = " (the Dirichlet concentration)" if name == "alpha" else ""
                raise ValueError(f"{name} must be > 0{meaning}, got {getattr(self, name)}")
        check_int(self.seed, "seed", limit=SEED_LIMIT)
        if self.backend is not None and self.backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS} or None, got {self.backend!r}")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")
        return self

    def check_runnable_here(self) -> TrainConfig:
        """What a valid config needs from this machine (a config may be valid and still run elsewhere, e.g.
        a Flower server sends it to CUDA nodes): CUDA for device cuda, and the kernel backend it names."""
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} needs CUDA, which this torch build or machine does not have "
                             f"(torch {torch.__version__}); use --device cpu")
        if self.backend is not None:
            reason = backends.unavailable_reason(self.backend, device.type)
            if reason is not None:
                raise ValueError(f"backend {self.backend!r} is not available on {self.device}: {reason}")
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
