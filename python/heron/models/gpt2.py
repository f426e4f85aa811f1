"""A GPT-2-style decoder with LoRA adapters, split after block n (fx-traceable, random init).

Client: token + position embeddings and blocks [0, n); auxiliary head: m blocks + final norm +
unembedding; server: blocks [n, n_layer) + final norm + unembedding. Every part's base weights
are frozen; LoRA adapters (rank r) on attention (qkv, proj) and MLP (fc, proj) layers are the
trainable parameters, so ZO perturbs only the adapters. The auxiliary blocks are initialised from
the first server blocks, as in the paper.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from heron.functional import linear_cross_entropy
from heron.models.split import SplitModel, freeze
from heron.nn import LoRALinear


@dataclass
class GPT2Config:
    """The fields of transformers' GPT2Config that the model uses (GPT-2 Medium by default)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 1024
    n_layer: int = 24
    n_head: int = 16
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def small(cls) -> GPT2Config:
        return cls(n_embd=768, n_layer=12, n_head=12)

    @classmethod
    def medium(cls) -> GPT2Config:
        return cls()


def _lora(in_features: int, out_features: int, rank: int) -> LoRALinear:
    return LoRALinear(in_features, out_features, rank=rank, alpha=2.0 * rank)


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention; LoRA on qkv, proj, fc and mlp proj."""

    def __init__(self, config: GPT2Config, rank: int):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.attn_qkv = _lora(d, 3 * d, rank)
        self.attn_proj = _lora(d, d, rank)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp_fc = _lora(d, 4 * d, rank)
        self.mlp_proj = _lora(4 * d, d, rank)

    def forward(self, x):
        batch, seq, d = x.shape
        head = d // self.n_head
        q, k, v = self.attn_qkv(self.ln_1(x)).split(d, dim=2)
        q = q.view(batch, seq, self.n_head, head).transpose(1, 2)
        k = k.view(batch, seq, self.n_head, head).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, head).transpose(1, 2)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(attn.transpose(1, 2).reshape(batch, seq, d))
        return x + self.mlp_proj(nn.functional.gelu(self.mlp_fc(self.ln_2(x)), approximate="tanh"))


class Embeddings(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.wte(tokens) + self.wpe(positions)


class Head(nn.Module):
    """Blocks, final LayerNorm and the unembedding (tied to a copy of the token embedding)."""

    def __init__(self, blocks: list[Block], config: GPT2Config, unembedding: torch.Tensor):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.unembed = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        with torch.no_grad():
            self.unembed.weight.copy_(unembedding)

    def forward(self, x):
        return self.unembed(self.ln_f(self.blocks(x)))


class HeadHidden(nn.Module):
    """A Head without its unembedding: blocks + final norm, returning hidden states (B, T, d).

    It shares the head's modules (same parameter names and objects), so an updater built on
    nn.Sequential(client, HeadHidden(aux)) trains the same parameters as one built on
    nn.Sequential(client, aux). Pair it with LMHeadLoss(aux.unembed): a forward-only (ZO) step
    then never holds the (B, T, vocab) logits.
    """

    def __init__(self, head: Head):
        super().__init__()
        self.blocks, self.ln_f = head.blocks, head.ln_f

    def forward(self, x):
        return self.ln_f(self.blocks(x))


class LMHeadLoss:
    """Next-token cross-entropy of hidden states through a (frozen) unembedding, logits computed
    in bounded chunks (heron.functional.linear_cross_entropy): loss(hidden (B, T, d), tokens (B, T))."""

    def __init__(self, unembed: nn.Linear):
        self.unembed = unembed

    def __call__(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden[:, :-1], self.unembed.weight, tokens[:, 1:], self.unembed.bias)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Embedding,)):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, LoRALinear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def gpt2_split(config: GPT2Config | None = None, *, cut: int = 6, aux_blocks: int = 3, rank: int = 8,
               n_layer: int | None = None) -> SplitModel:
    """GPT-2 split after block `cut`; aux = `aux_blocks` blocks + unembedding; LoRA rank `rank`.

    n_layer overrides config.n_layer (e.g. to build only the layers a benchmark needs).
    """
    config = copy.copy(config or GPT2Config.medium())
    if n_layer is not None:
        config.n_layer = n_layer
    if not 1 <= cut < config.n_layer:
        raise ValueError(f"cut must be in [1, n_layer - 1 = {config.n_layer - 1}], got {cut}")
    embeddings = Embeddings(config)
    blocks = [Block(config, rank) for _ in range(config.n_layer)]
    client = nn.Sequential(embeddings, *blocks[:cut])
    _init(client)
    for block in blocks[cut:]:
        _init(block)
    unembedding = embeddings.wte.weight.detach()
    aux = Head([copy.deepcopy(b) for b in blocks[cut:cut + aux_blocks]], config, unembedding)
    server = Head(blocks[cut:], config, unembedding)
    for part in (client, aux, server):
        freeze(part)
        for m in part.modules():
            if isinstance(m, LoRALinear):
                m.lora_a.requires_grad_(True)
                m.lora_b.requires_grad_(True)
    return SplitModel(client, aux, server)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) predict tokens (B, T) shifted by one."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


