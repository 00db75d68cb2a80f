"""DenseNet-40 as used by network slimming (Liu et al., ICCV 2017).

Growth rate 12, three dense blocks of ``(depth-4)/3`` layers, no bottleneck and
no compression.  Each dense layer is BN-ReLU-conv3x3 whose output is
concatenated to its input; transitions are BN-ReLU-conv1x1-avgpool.  The
reference ``channel_selection`` masking layer is omitted: channels are removed
physically instead.  Module names follow the reference implementation
(``conv1``, ``dense1..3``, ``trans1..2``, ``bn``, ``fc``).
"""

from __future__ import annotations

import torch
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth_rate`` maps, concatenated to the input."""

    def __init__(self, inplanes: int, growth_rate: int = 12) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        return torch.cat((x, out), 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 followed by 2x2 average pooling."""

    def __init__(self, inplanes: int, outplanes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, outplanes, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv1(self.relu(self.bn1(x))))


class CifarDenseNet(nn.Module):
    """DenseNet (BasicBlock variant) for 32x32 inputs, depth = 3n+4."""

    def __init__(
        self,
        depth: int = 40,
        num_classes: int = 10,
        in_channels: int = 3,
        growth_rate: int = 12,
        compression: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 7 or (depth - 4) % 3 != 0:
            raise ValueError(f"DenseNet depth must be 3n+4 (n >= 1), got {depth}")
        n = (depth - 4) // 3
        self.depth = depth
        self.growth_rate = growth_rate
        self.inplanes = growth_rate * 2
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, padding=1, bias=False)
        self.dense1 = self._make_denseblock(n)
        self.trans1 = self._make_transition(compression)
        self.dense2 = self._make_denseblock(n)
        self.trans2 = self._make_transition(compression)
        self.dense3 = self._make_denseblock(n)
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_denseblock(self, blocks: int) -> nn.Sequential:
        layers = []
        for _ in range(blocks):
            layers.append(DenseLayer(self.inplanes, self.growth_rate))
            self.inplanes += self.growth_rate
        return nn.Sequential(*layers)

    def _make_transition(self, compression: float) -> Transition:
        inplanes = self.inplanes
        outplanes = int(inplanes // compression)
        self.inplanes = outplanes
        return Transition(inplanes, outplanes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.dense3(x)
        x = self.relu(self.bn(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def densenet40(num_classes: int = 10, in_channels: int = 3) -> CifarDenseNet:
    return CifarDenseNet(40, num_classes, in_channels)
