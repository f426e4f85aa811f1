"""A model cut in two, plus the client's auxiliary head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from heron.kernels.nn import LoRALinear


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


def freeze_all_but_lora(module: nn.Module) -> nn.Module:
    """Freeze every parameter except the adapters (lora_a, lora_b) of heron's LoRALinear layers."""
    freeze(module)
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.lora_a.requires_grad_(True)
            m.lora_b.requires_grad_(True)
    return module


def lora_linear(in_features: int, out_features: int, rank: int) -> LoRALinear | nn.Linear:
    """The LoRA layer of the split language models: alpha = 2 * rank (adapter scale 2); rank 0: a
    plain nn.Linear (full-parameter training)."""
    if rank == 0:
        return nn.Linear(in_features, out_features)
    return LoRALinear(in_features, out_features, rank=rank, alpha=2.0 * rank)
