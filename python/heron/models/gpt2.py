"""A GPT-2-style decoder with LoRA adapters, split after block n (fx-traceable, random init).

Client: token + position embeddings and blocks [0, n); auxiliary head: m blocks + final norm +
unembedding; server: blocks [n, n_layer) + final norm + unembedding. Every part's base weights
are frozen; LoRA adapters (rank r) on attention (qkv, proj) and MLP (fc, proj) layers are the
trainable parameters, so ZO perturbs only the adapters. The auxiliary blocks are initialised from
the first server blocks, as in the paper.

The configuration is heron's `GPT2Config` or a `transformers.GPT2Config` (converted field by field;
transformers itself is never imported here). The decoder has no dropout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from heron.kernels.functional import linear_cross_entropy
from heron.kernels.nn import LoRALinear
from heron.models.split import SplitModel, freeze_all_but_lora, lora_linear

# transformers' activation_function names this decoder implements, as F.gelu's `approximate`.
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# transformers GPT2Config switches that change the computation; heron implements their defaults only.
_DEFAULT_SWITCHES = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "add_cross_attention": False}


@dataclass
class GPT2Config:
    """The fields of transformers' GPT2Config that the model uses (GPT-2 Medium by default).

    n_inner: MLP width (None: 4 * n_embd); activation_function: "gelu_new" / "gelu_pytorch_tanh"
    (tanh GELU, GPT-2's) or "gelu" (exact); initializer_range: std of the random initialisation.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 1024
    n_layer: int = 24
    n_head: int = 16
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation_function not in _GELU:
            raise ValueError(f"activation_function {self.activation_function!r} is not implemented; "
                             f"supported: {sorted(_GELU)}")

    @classmethod
    def small(cls) -> GPT2Config:
        return cls(n_embd=768, n_layer=12, n_head=12)

    @classmethod
    def medium(cls) -> GPT2Config:
        return cls()

    @classmethod
    def from_transformers(cls, config: Any) -> GPT2Config:
        """Convert a `transformers.GPT2Config` field by field (dropout probabilities are not used).

        Raises ValueError for settings this decoder does not implement (e.g. cross-attention).
        """
        model_type = getattr(config, "model_type", None)
        if model_type != "gpt2":
            raise TypeError(f"expected a transformers GPT2Config (model_type 'gpt2'), got {type(config).__name__} "
                            f"with model_type {model_type!r}")
        for name, default in _DEFAULT_SWITCHES.items():
            if getattr(config, name, default) != default:
                raise ValueError(f"GPT2Config.{name}={getattr(config, name)!r} is not implemented "
                                 f"(heron's decoder implements {name}={default!r})")
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    @property
    def inner(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention; LoRA on qkv, proj, fc and mlp proj."""

    def __init__(self, config: GPT2Config, rank: int):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.approximate = _GELU[config.activation_function]
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.attn_qkv = lora_linear(d, 3 * d, rank)
        self.attn_proj = lora_linear(d, d, rank)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp_fc = lora_linear(d, config.inner, rank)
        self.mlp_proj = lora_linear(config.inner, d, rank)

    def forward(self, x):
        """x (B, T, n_embd) -> (B, T, n_embd)."""
        batch, seq, d = x.shape
        head = d // self.n_head
        q, k, v = self.attn_qkv(self.ln_1(x)).split(d, dim=2)
        q = q.view(batch, seq, self.n_head, head).transpose(1, 2)
        k = k.view(batch, seq, self.n_head, head).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, head).transpose(1, 2)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(attn.transpose(1, 2).reshape(batch, seq, d))
        return x + self.mlp_proj(nn.functional.gelu(self.mlp_fc(self.ln_2(x)), approximate=self.approximate))


class Embeddings(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)

    def forward(self, tokens):
        """tokens (B, T) int64 -> (B, T, n_embd)."""
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
        """x (B, T, n_embd) -> logits (B, T, vocab_size)."""
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
    in bounded chunks (heron.kernels.functional.linear_cross_entropy): loss(hidden (B, T, d), tokens (B, T))."""

    def __init__(self, unembed: nn.Linear):
        self.unembed = unembed

    def __call__(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden[:, :-1], self.unembed.weight, tokens[:, 1:], self.unembed.bias)


def _init(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Embedding,)):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, (LoRALinear, nn.Linear)):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)


def gpt2_split(config: GPT2Config | Any | None = None, *, cut: int = 6, aux_blocks: int = 3, rank: int = 8,
               n_layer: int | None = None, train_final_norm: bool = False) -> SplitModel:
    """GPT-2 split after block `cut`; aux = `aux_blocks` blocks + unembedding; LoRA rank `rank`
    (0: no adapters; the blocks and final norms are trained whole, the embeddings and the
    unembedding stay frozen).

    config: heron's GPT2Config or a transformers.GPT2Config (default GPT-2 Medium). n_layer
    overrides config.n_layer (e.g. to build only the layers a benchmark needs). Client: tokens
    (B, T) -> smashed (B, T, n_embd); aux and server: smashed -> logits (B, T, vocab_size).

    train_final_norm: also train the final LayerNorm (gain and bias) of the aux head and the
    server. With random frozen weights a logit is at most |ln_f(h)| * |unembedding row|, about
    sqrt(n_embd) * 0.02 * sqrt(n_embd) (2.6 for n_embd 128), which caps how peaked the prediction
    can get: on text-convention the test loss of a LoRA-only model stalls at 4.85 nats per byte,
    above the 3.10 of the unigram distribution. A pretrained base does not need this.
    """
    if config is None:
        config = GPT2Config.medium()
    elif not isinstance(config, GPT2Config):
        config = GPT2Config.from_transformers(config)
    config = copy.copy(config)
    if n_layer is not None:
        config.n_layer = n_layer
    if not 1 <= cut < config.n_layer:
        raise ValueError(f"cut must be in [1, n_layer - 1 = {config.n_layer - 1}], got {cut}")
    if not 0 <= aux_blocks <= config.n_layer - cut:
        raise ValueError(f"aux_blocks must be in [0, n_layer - cut = {config.n_layer - cut}], got {aux_blocks}")
    embeddings = Embeddings(config)
    blocks = [Block(config, rank) for _ in range(config.n_layer)]
    client = nn.Sequential(embeddings, *blocks[:cut])
    _init(client, config.initializer_range)
    for block in blocks[cut:]:
        _init(block, config.initializer_range)
    unembedding = embeddings.wte.weight.detach()
    aux = Head([copy.deepcopy(b) for b in blocks[cut:cut + aux_blocks]], config, unembedding)
    server = Head(blocks[cut:], config, unembedding)
    for part in (client, aux, server):
        freeze_all_but_lora(part)
        if rank == 0:
            for module in part.modules():
                if isinstance(module, (Block, nn.LayerNorm)):
                    module.requires_grad_(True)
    if train_final_norm:
        for head in (aux, server):
            head.ln_f.requires_grad_(True)
    return SplitModel(client, aux, server)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) predict tokens (B, T) shifted by one."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


