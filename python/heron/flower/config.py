"""The run's configuration on the wire and in Flower's run config.

A Flower run is configured by the engine's `TrainConfig` (the same fields as `heron train`) plus
`FlowerSettings` (what only the Flower transport needs). Both travel as flat scalar mappings: the
ServerApp reads them from `context.run_config` (the `[tool.flwr.app.config]` table of the app's
pyproject.toml, overridable with `flwr run --run-config`), and the server sends the TrainConfig to
every client in each round's message as a ConfigRecord. Flower config values cannot be None, so
`TrainConfig.backend = None` travels as "".

Parsing is strict: unknown keys, missing keys (on the wire) and wrongly typed values are errors
naming the key, the expected type and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from heron.sfl.config import TrainConfig
from heron.sfl.methods import AUX_METHODS

# TrainConfig field -> the Python type its value must have (float fields also accept ints); a test keeps it in
# step with TrainConfig.
_TRAIN_TYPES: dict[str, type] = {
    "method": str, "model": str, "dataset": str, "clients": int, "rounds": int, "local_steps": int,
    "upload_every": int, "batch_size": int, "partition": str, "alpha": float, "client_optimizer": str,
    "client_lr": float, "zo_lr": float, "mu": float, "q": int, "server_optimizer": str, "server_lr": float,
    "weighting": str, "seed": int, "device": str, "backend": str, "client_upload": str, "zo_schedule": str,
    "zo_rank": int, "cut": int, "aux_layers": int,
}


_OPTIONAL_INTS = ("cut", "aux_layers")  # None travels as 0

# The default round timeout (s): a round of the app's default run (cnn, 10 local steps) takes well under a
# minute on a 2-core CPU; ResNet-18 or many local steps on small devices may need more (set round_timeout).
ROUND_TIMEOUT = 600.0


@dataclass
class FlowerSettings:
    """What the Flower transport adds to a TrainConfig.

    round_timeout: seconds the ServerApp waits for a round's replies; a client that has not replied by
        then is left out of the round (its message expires, so it does not train a round the server gave
        up on). Finite, so a node that hangs (while still heartbeating) cannot stall the run.
    node_wait: seconds the ServerApp waits for `clients` nodes before round 1 (later rounds: for any
        node, when none is connected); each round runs with the nodes connected.
    report: when set, the ServerApp writes the run's JSON report (heron train's format) here.
    max_smashed_ratio, max_update_ratio, clip_ratio: the bounds on one client's reply
        (heron.flower.screen): its smashed data at most max_smashed_ratio x the largest output of the
        broadcast client part on the server's images; its update's norm at most max_update_ratio x the
        broadcast model's norm (beyond either, the reply is rejected); within them, its update's norm
        clipped to clip_ratio x the round's median update norm.
    """

    round_timeout: float = ROUND_TIMEOUT
    node_wait: float = 120.0
    report: str = ""
    max_smashed_ratio: float = 100.0
    max_update_ratio: float = 10.0
    clip_ratio: float = 3.0

    def validate(self) -> FlowerSettings:
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            raise ValueError(f"round_timeout must be a finite number of seconds > 0, got {self.round_timeout}")
        if not (math.isfinite(self.node_wait) and self.node_wait >= 0):
            raise ValueError(f"node_wait must be a finite number >= 0, got {self.node_wait}")
        for name in ("max_smashed_ratio", "max_update_ratio", "clip_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.clip_ratio < 1:
            raise ValueError(f"clip_ratio must be >= 1 (below 1 it clips the median client), got {self.clip_ratio}")
        return self


_SETTING_TYPES: dict[str, type] = {"round_timeout": float, "node_wait": float, "report": str,
                                   "max_smashed_ratio": float, "max_update_ratio": float, "clip_ratio": float}


def check_flower_method(method: str) -> str:
    """The Flower app runs the auxiliary-head methods only."""
    if method not in AUX_METHODS:
        raise ValueError(f"method {method!r} is not supported by the Flower app: SFL-V1/V2 need a server round "
                         f"trip (the cut-layer gradient) after every local step, which this app does not do; "
                         f"use one of {', '.join(AUX_METHODS)}, or `heron train` for {method}")
    return method


def check_flower_dataset(dataset: str) -> str:
    """The Flower app's clients build image models: text datasets run with `heron train`."""
    from heron.sfl.data import DATASET_KINDS
    from heron.sfl.methods import IMAGE

    kind = DATASET_KINDS.get(dataset)
    if kind is not None and kind != IMAGE:
        images = ", ".join(n for n, k in DATASET_KINDS.items() if k == IMAGE)
        raise ValueError(f"dataset {dataset!r} ({kind}) is not supported by the Flower app yet; use one of {images}, "
                         f"or `heron train` for text datasets")
    return dataset


def _typed(key: str, value: Any, kind: type) -> Any:
    # bool is an int subclass in Python; a bool where a number belongs is a mistake, not a 0 or 1.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise TypeError(f"config key {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def train_config_to_record(config: TrainConfig) -> dict[str, str | int | float]:
    """TrainConfig as flat Flower config scalars (backend None -> "", cut / aux_layers None -> 0: the
    model's default split; a real split point is >= 1)."""
    values = asdict(config)
    values["backend"] = values["backend"] or ""
    for key in _OPTIONAL_INTS:
        values[key] = values[key] or 0
    return values


def train_config_from_record(record: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig a round message carries: exactly TrainConfig's fields, each correctly typed, validated."""
    missing, extra = sorted(_TRAIN_TYPES.keys() - record.keys()), sorted(record.keys() - _TRAIN_TYPES.keys())
    if missing or extra:
        raise ValueError(f"train config: missing keys {missing}, unexpected keys {extra}")
    values = {key: _typed(key, record[key], kind) for key, kind in _TRAIN_TYPES.items()}
    return TrainConfig(**_unset_to_none(values)).validate()


def _unset_to_none(values: dict[str, Any]) -> dict[str, Any]:
    """Flower's stand-ins for None (backend "", cut / aux_layers 0: the model's default) back to None."""
    if "backend" in values:
        values["backend"] = values["backend"] or None
    for key in _OPTIONAL_INTS:
        if key in values:
            if values[key] < 0:
                raise ValueError(f"config key {key!r} must be >= 0 (0: the model's default), got {values[key]}")
            values[key] = values[key] or None
    return values


def from_run_config(run_config: Mapping[str, Any]) -> tuple[TrainConfig, FlowerSettings]:
    """(TrainConfig, FlowerSettings) from a Flower run config; absent keys take their defaults."""
    unknown = sorted(run_config.keys() - _TRAIN_TYPES.keys() - _SETTING_TYPES.keys())
    if unknown:
        raise ValueError(f"run config has unknown keys {unknown}; valid keys: "
                         f"{sorted(_TRAIN_TYPES) + sorted(_SETTING_TYPES)}")
    train = _unset_to_none({k: _typed(k, v, _TRAIN_TYPES[k]) for k, v in run_config.items() if k in _TRAIN_TYPES})
    settings = {k: _typed(k, v, _SETTING_TYPES[k]) for k, v in run_config.items() if k in _SETTING_TYPES}
    config = TrainConfig(**train).validate()
    check_flower_method(config.method)
    return config, FlowerSettings(**settings).validate()
