"""Named client configurations for profiling and benchmarks (random weights and inputs: memory
and FLOPs do not depend on values)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from heron.models import GPT2Config, gpt2_split, resnet18_split
from heron.models.gpt2 import HeadHidden, LMHeadLoss, lm_loss
from heron.zo import updaters
from heron.zo.updaters import ZOUpdater


@dataclass
class ClientConfig:
    """A client model (client part + aux head, module "0" is the cut), a batch, a loss and the
    optimizer settings shared by every updater."""

    name: str
    model: nn.Module
    batch: tuple[Any, Any]
    loss_fn: Callable
    updater_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # (model, loss_fn) for the forward-only updaters (zo, zo-seq, mezo) when it differs: the same
    # parameters, with the LM head's logits folded into a chunked loss (never held whole).
    forward_only: tuple[nn.Module, Callable] | None = None


def resnet18_paper(batch_size: int = 256, device: str = "cpu") -> ClientConfig:
    """The paper's ResNet-18 client: split after the 2nd BatchNorm, FC aux head, CIFAR-10 shapes, Adam lr 1e-4."""
    torch.manual_seed(0)
    model = resnet18_split(3, 10, 32).client_with_aux().to(device)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    return ClientConfig("resnet18-paper", model, (x, y), nn.functional.cross_entropy,
                        {"optimizer": "adam", "lr": 1e-4},
                        f"ResNet-18 client (conv-bn-relu-conv-bn) + FC aux, batch {batch_size}, 3x32x32")


def gpt2m_paper(batch_size: int = 8, seq_len: int = 512, device: str = "cpu") -> ClientConfig:
    """The paper's GPT2-Medium client: 6 blocks, aux = 3 blocks + unembedding, LoRA r=8, seq 512, batch 8."""
    torch.manual_seed(0)
    split = gpt2_split(GPT2Config.medium(), cut=6, aux_blocks=3, rank=8, n_layer=9)
    model = split.client_with_aux().to(device)
    tokens = torch.randint(0, GPT2Config.medium().vocab_size, (batch_size, seq_len), device=device)
    client, aux = model[0], model[1]
    forward_only = (nn.Sequential(client, HeadHidden(aux)), LMHeadLoss(aux.unembed))
    return ClientConfig("gpt2m-paper", model, (tokens, tokens), lm_loss, {"optimizer": "adam", "lr": 1e-4},
                        f"GPT-2 Medium client: 6 blocks + aux 3 blocks + unembedding, LoRA r=8, "
                        f"batch {batch_size} x seq {seq_len}", forward_only)


def gpt2m_full(batch_size: int = 2, seq_len: int = 128, device: str = "cpu",
               config: GPT2Config | None = None) -> ClientConfig:
    """A full-parameter transformer client with GPT-2 Medium's shapes and no LoRA: 2 blocks, aux =
    1 block + final norm + unembedding, every block and final-norm parameter trained (37.8 M; the
    embeddings and unembedding frozen), Adam lr 1e-5, batch 2 x seq 128 (the case where parameters,
    not activations, dominate a step). config: another GPT2Config (the tests' tiny one)."""
    torch.manual_seed(0)
    config = config or GPT2Config.medium()
    split = gpt2_split(config, cut=2, aux_blocks=1, rank=0, n_layer=3)
    model = split.client_with_aux().to(device)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    client, aux = model[0], model[1]
    forward_only = (nn.Sequential(client, HeadHidden(aux)), LMHeadLoss(aux.unembed))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ClientConfig("gpt2m-full", model, (tokens, tokens), lm_loss, {"optimizer": "adam", "lr": 1e-5},
                        f"GPT-2 Medium-shaped client trained whole (no LoRA, {trained / 1e6:.1f} M parameters): "
                        f"2 blocks + aux 1 block + unembedding, batch {batch_size} x seq {seq_len}", forward_only)


CONFIGS: dict[str, Callable[..., ClientConfig]] = {"resnet18-paper": resnet18_paper, "gpt2m-paper": gpt2m_paper,
                                                    "gpt2m-full": gpt2m_full}
FORWARD_ONLY = ("zo", "zo-seq", "zo-inplace", "zo-lowrank", "zo-seq-lowrank", "zo-whole", "zo-seq-whole", "mezo")
# zo-lowrank: rank-8 directions on Linear and Conv2d weights (the paper's LoRA rank); zo-whole:
# whole-batch convolutions (conv_chunks=False); zo-inplace: executor="in_place".
UPDATERS = {**updaters.UPDATERS, "zo-seq": functools.partial(ZOUpdater, schedule="sequential"),
            "zo-inplace": functools.partial(ZOUpdater, schedule="sequential", executor="in_place"),
            "zo-whole": functools.partial(ZOUpdater, conv_chunks=False),
            "zo-seq-whole": functools.partial(ZOUpdater, schedule="sequential", conv_chunks=False),
            "zo-lowrank": functools.partial(ZOUpdater, perturbation="lowrank", rank=8),
            "zo-seq-lowrank": functools.partial(ZOUpdater, schedule="sequential", perturbation="lowrank", rank=8)}


def build_config(name: str, **kwargs: Any) -> ClientConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; valid: {sorted(CONFIGS)}")
    return CONFIGS[name](**kwargs)


def build_updater(kind: str, config: ClientConfig, **overrides: Any):
    if kind not in UPDATERS:
        raise KeyError(f"unknown updater {kind!r}; valid: {sorted(UPDATERS)}")
    kwargs = {**config.updater_kwargs, "cut": "0", **overrides}
    model, loss_fn = config.model, config.loss_fn
    if kind in FORWARD_ONLY and config.forward_only is not None:
        model, loss_fn = config.forward_only
    return UPDATERS[kind](model, loss_fn, **kwargs)
