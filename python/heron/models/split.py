"""A model cut in two, plus the client's auxiliary head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SplitModel:
    """client: f_c (input -> smashed data); aux: the client's auxiliary head (smashed -> logits);
    server: the server part (smashed -> logits). `client_with_aux()` is what a client updater trains."""

    client: nn.Module
    aux: nn.Module
    server: nn.Module

    def client_with_aux(self) -> nn.Sequential:
        """nn.Sequential(client, aux): module "0" is the cut, so its output is the smashed data."""
        return nn.Sequential(self.client, self.aux)

    def full(self) -> nn.Sequential:
        return nn.Sequential(self.client, self.server)

    def to(self, *args, **kwargs) -> SplitModel:
        for part in (self.client, self.aux, self.server):
            part.to(*args, **kwargs)
        return self


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def smashed_shape(split: SplitModel, sample: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(split.client(sample).shape)
