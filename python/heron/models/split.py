"""A model cut in two, plus the client's auxiliary head."""

from __future__ import annotations

from dataclasses import dataclass

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


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module
