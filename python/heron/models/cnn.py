"""A small CNN split like the paper's ResNet-18 (after its 2nd BatchNorm), for quick CPU runs.

Client: conv(3x3, 32) -> bn -> relu -> conv(3x3, 32) -> bn; auxiliary head: relu -> global
average pool -> FC; server: relu -> maxpool -> conv(3x3, 64) -> bn -> relu -> maxpool -> FC(128)
-> relu -> FC(classes).
"""

from __future__ import annotations

from torch import nn

from heron.models.split import SplitModel


def cnn_split(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32) -> SplitModel:
    client = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
    )
    aux = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    pooled = image_size // 4
    server = nn.Sequential(
        nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * pooled * pooled, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )
    return SplitModel(client, aux, server)
