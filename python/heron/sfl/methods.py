"""Registries of the SFL engine: methods, models and the client updater each method uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from heron.models import SplitModel, cnn_split, resnet18_split

METHODS = ("heron", "cse-fsl", "mezo", "sflv1", "sflv2")
AUX_METHODS = ("heron", "cse-fsl", "mezo")
UPDATER_OF_METHOD = {"heron": "zo", "cse-fsl": "fo", "mezo": "mezo"}


@dataclass(frozen=True)
class ImageShape:
    in_channels: int
    image_size: int
    num_classes: int


def _resnet18(shape: ImageShape) -> SplitModel:
    return resnet18_split(shape.in_channels, shape.num_classes, shape.image_size)


def _cnn(shape: ImageShape) -> SplitModel:
    return cnn_split(shape.in_channels, shape.num_classes, shape.image_size)


MODELS: dict[str, Callable[[ImageShape], SplitModel]] = {"resnet18": _resnet18, "cnn": _cnn}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return name


def build_split_model(name: str, shape: ImageShape) -> SplitModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](shape)


def cross_entropy() -> Callable:
    return nn.functional.cross_entropy
