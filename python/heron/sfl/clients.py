"""A run's clients, built from its TrainConfig: the same data batches, updater seed and optimizer in
every process that builds client i (the engine and the Flower ClientApp alike)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from heron.kernels.stream import derive_seed
from heron.sfl.config import TrainConfig
from heron.sfl.methods import AUX_METHODS, UPDATER_OF_METHOD
from heron.sfl.roles import Client, SplitClient
from heron.sfl.tasks import client_batches
from heron.zo.updaters import UPDATERS


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """torch's SGD, Adam or AdamW over params."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"optimizer must be one of sgd, adam, adamw, got {name!r}")


def build_client(config: TrainConfig, client_id: int, data, model: nn.Module, loss_fn: Callable,
                 device: torch.device | str = "cpu", *, dataset=None) -> Client | SplitClient:
    """Client `client_id` of a run.

    data: the client's ClientData (x (n, C, H, W), y (n,)); model: the client's own copy of the
    global client model (client part + aux head for the auxiliary-head methods, the client part
    alone for SFL-V1/V2), already on `device`. Batches, updater seed and optimizer depend only on
    (config, client_id), so every process that builds client i builds the same client. dataset:
    the run's dataset when its batches need it (padded token ids are trimmed per batch).
    """
    cfg = config
    batches = client_batches(dataset, data.x, data.y, cfg.batch_size, cfg.seed, client_id)
    if cfg.method not in AUX_METHODS:
        optimizer = make_optimizer(cfg.client_optimizer, model.parameters(), cfg.client_lr)
        return SplitClient(client_id, model, optimizer, batches, local_steps=cfg.local_steps, device=device)
    kind = UPDATER_OF_METHOD[cfg.method]
    kwargs: dict[str, Any] = {"optimizer": cfg.client_optimizer, "seed": derive_seed(cfg.seed, client_id),
                              "cut": "0", "lr": cfg.client_lr}
    if kind in ("zo", "mezo"):
        kwargs.update(mu=cfg.mu, q=cfg.q, lr=cfg.zo_lr)
    if kind == "zo":
        kwargs["schedule"] = cfg.zo_schedule
        if cfg.zo_rank:
            kwargs.update(perturbation="lowrank", rank=cfg.zo_rank)
        if cfg.backend is not None:
            kwargs["backend"] = cfg.backend
    updater = UPDATERS[kind](model, loss_fn, **kwargs)
    return Client(client_id, model, updater, batches, local_steps=cfg.local_steps,
                  upload_every=cfg.upload_every, device=device)
