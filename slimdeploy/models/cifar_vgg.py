"""CIFAR VGG as defined by network slimming (Liu et al., ICCV 2017).

Each integer entry of a configuration is a 3x3 convolution (padding 1, no
bias) followed by BatchNorm and ReLU; ``'M'`` is a 2x2 max-pool.  The head is
a global average pool followed by a single linear layer.  Module names follow
the reference implementation (``feature``, ``classifier``), so its
checkpoints load directly into this model.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

CfgEntry = Union[int, str]

VGG_CONFIGS: dict[int, tuple[CfgEntry, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (
        64, 64, "M",
        128, 128, "M",
        256, 256, 256, 256, "M",
        512, 512, 512, 512, "M",
        512, 512, 512, 512,
    ),
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs.

    Args:
        depth: one of 11, 13, 16, 19 (ignored when ``cfg`` is given).
        num_classes: number of output classes.
        in_channels: number of input image channels.
        cfg: optional explicit configuration (e.g. a slimmed one).
    """

    def __init__(
        self,
        depth: int = 19,
        num_classes: int = 10,
        in_channels: int = 3,
        cfg: Sequence[CfgEntry] | None = None,
    ) -> None:
        super().__init__()
        if cfg is None:
            if depth not in VGG_CONFIGS:
                raise ValueError(f"unsupported VGG depth {depth}; allowed: {sorted(VGG_CONFIGS)}")
            cfg = VGG_CONFIGS[depth]
        self.cfg = list(cfg)
        self.feature = self._make_layers(self.cfg, in_channels)
        last = [v for v in self.cfg if v != "M"][-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(int(last), num_classes)

    @staticmethod
    def _make_layers(cfg: Sequence[CfgEntry], in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                c_out = int(v)
                layers += [
                    nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(11, num_classes, in_channels)


def vgg13(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(13, num_classes, in_channels)


def vgg16(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(16, num_classes, in_channels)


def vgg19(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(19, num_classes, in_channels)
