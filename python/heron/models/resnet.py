"""ResNet-18 (CIFAR-style 3x3 stem) split after its 2nd BatchNorm, as in the HERON-SFL paper.

Client: conv1 -> bn1 -> relu -> layer1[0].conv1 -> layer1[0].bn1 (the 2nd BatchNorm2d).
Auxiliary head: one fully connected layer on the flattened smashed data.
Server: the rest of layer1[0] (relu -> conv2 -> bn2 -> relu) and layer1[1:] ... fc.
The cut falls inside the first residual block; the client does not upload the block's input, so
the server's part of that block has no skip connection (the paper does not say how it is kept).
Channels adapt to the dataset (in_channels 1 for MNIST, 3 for CIFAR).
"""

from __future__ import annotations

from torch import nn

from heron.models.split import SplitModel


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


class _BlockTail(nn.Module):
    """The server's half of the split block: relu -> conv2 -> bn2 -> relu."""

    def __init__(self, block: BasicBlock):
        super().__init__()
        self.conv2, self.bn2 = block.conv2, block.bn2

    def forward(self, x):
        return nn.functional.relu(self.bn2(self.conv2(nn.functional.relu(x))))


def _layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes))


def resnet18_split(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> SplitModel:
    """The paper's split ResNet-18 for (in_channels, image_size, image_size) inputs."""
    first = BasicBlock(64, 64)
    client = nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        first.conv1,
        first.bn1,
    )
    aux = nn.Sequential(nn.Flatten(), nn.Linear(64 * image_size * image_size, num_classes))
    server = nn.Sequential(
        _BlockTail(first),
        BasicBlock(64, 64),
        _layer(64, 128, 2),
        _layer(128, 256, 2),
        _layer(256, 512, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )
    return SplitModel(client, aux, server)
