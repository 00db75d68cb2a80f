"""CIFAR ResNets.

* :class:`CifarResNet` - basic-block ResNet-20/56/110 (He et al., CVPR 2016),
  depth ``6n+2``, stage widths 16/32/64, with 1x1 conv + BN projection
  shortcuts where the shape changes (the variant used by torch-pruning's
  CIFAR-10 benchmarks; ResNet-56 has about 0.86M parameters).
* :class:`PreResNet` - the pre-activation bottleneck ResNet-164 used by the
  network slimming papers (depth ``9n+2``), without their ``channel_selection``
  masking layer: channels are removed physically instead.  Module names follow
  the reference implementation (``conv1``, ``layer1..3``, ``bn``, ``fc``;
  blocks ``bn1, conv1, bn2, conv2, bn3, conv3, downsample``).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """Basic-block ResNet for 32x32 inputs, depth = 6n+2."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (n >= 1), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class Bottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1.

    ``cfg`` gives (input channels seen by conv1, conv1 out, conv2 out); the
    output width is ``planes * expansion``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        cfg: tuple[int, int, int],
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cfg[0], cfg[1], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg[1])
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cfg[1], cfg[2], kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cfg[2])
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(cfg[2], planes * self.expansion, kernel_size=1, bias=False)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + self.downsample(x)


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet (network slimming's ResNet-164), depth = 9n+2."""

    def __init__(self, depth: int = 164, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"pre-activation ResNet depth must be 9n+2 (n >= 1), got {depth}")
        n = (depth - 2) // 9
        self.depth = depth
        cfg = [[16, 16, 16], [64, 16, 16] * (n - 1),
               [64, 32, 32], [128, 32, 32] * (n - 1),
               [128, 64, 64], [256, 64, 64] * (n - 1)]
        flat = [c for part in cfg for c in part]
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(16, n, flat[0:3 * n])
        self.layer2 = self._make_layer(32, n, flat[3 * n:6 * n], stride=2)
        self.layer3 = self._make_layer(64, n, flat[6 * n:9 * n], stride=2)
        self.bn = nn.BatchNorm2d(64 * Bottleneck.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, cfg: list[int], stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
            )
        layers = [Bottleneck(self.inplanes, planes, (cfg[0], cfg[1], cfg[2]), stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        for i in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, (cfg[3 * i], cfg[3 * i + 1], cfg[3 * i + 2])))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.relu(self.bn(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, num_classes, in_channels)


def resnet164(num_classes: int = 10, in_channels: int = 3) -> PreResNet:
    return PreResNet(164, num_classes, in_channels)
