"""Model registry: build CIFAR models by name, or any torchvision classifier.

Names:
    ``vgg11, vgg13, vgg16, vgg19, resnet20, resnet56, resnet110, resnet164,
    densenet40`` - the built-in CIFAR (32x32) models;
    ``torchvision:<builder>`` - a torchvision classification builder, built
    with ``weights=None`` (nothing is downloaded).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import cifar_densenet, cifar_resnet, cifar_vgg

TORCHVISION_PREFIX = "torchvision:"

_BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "vgg11": cifar_vgg.vgg11,
    "vgg13": cifar_vgg.vgg13,
    "vgg16": cifar_vgg.vgg16,
    "vgg19": cifar_vgg.vgg19,
    "resnet20": cifar_resnet.resnet20,
    "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110,
    "resnet164": cifar_resnet.resnet164,
    "densenet40": cifar_densenet.densenet40,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILTINS)

_ALLOWED_TEXT = ", ".join(MODEL_NAMES) + ", " + TORCHVISION_PREFIX + "<builder>"


def torchvision_builders() -> tuple[str, ...]:
    """Names of the torchvision classification builders (``torchvision.models``)."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def is_known_model(name: str) -> bool:
    """True if ``name`` is a built-in model or ``torchvision:<existing builder>``."""
    if not isinstance(name, str):
        return False
    if name in _BUILTINS:
        return True
    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX):] in torchvision_builders()
    return False


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise ValueError(f"unknown model {name!r}; allowed: {_ALLOWED_TEXT}")
    if name in _BUILTINS:
        return
    if name.startswith(TORCHVISION_PREFIX):
        builder = name[len(TORCHVISION_PREFIX):]
        builders = torchvision_builders()
        if builder not in builders:
            raise ValueError(
                f"unknown torchvision builder {builder!r} in model {name!r}; "
                f"allowed builders: {', '.join(builders)}"
            )
        return
    raise ValueError(f"unknown model {name!r}; allowed: {_ALLOWED_TEXT}")


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions, BN weight 1 / bias 0, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BatchNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def set_bn_weight(model: nn.Module, value: float) -> int:
    """Fill every affine BatchNorm weight (gamma) with ``value``; returns the number of layers set."""
    count = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None:
                m.weight.fill_(float(value))
                count += 1
    return count


def get_classifier(model: nn.Module) -> nn.Module:
    """The final classification layer (the last ``nn.Linear`` in module order).

    Useful as ``ignored_layers`` for pruning.  Raises ``ValueError`` if the
    model has no linear layer (e.g. torchvision SqueezeNet, whose head is a conv).
    """
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return last


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the stem convolution of a torchvision model for one with ``in_channels`` inputs.

    The stem is the first module (in registration order) owning parameters; it
    must be a plain ``nn.Conv2d``.
    """
    for qual_name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            raise ValueError(
                f"cannot set in_channels={in_channels} for {type(model).__name__}: "
                f"first layer {qual_name!r} is {type(module).__name__}, not a plain Conv2d"
            )
        new = nn.Conv2d(
            in_channels,
            module.out_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        parent_name, _, child_name = qual_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, new)
        return
    raise ValueError(f"cannot set in_channels={in_channels} for {type(model).__name__}: no stem Conv2d found")


def build_model(
    name: str,
    num_classes: int,
    *,
    bn_init: float | None = None,
    in_channels: int = 3,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: a built-in name (see ``MODEL_NAMES``) or ``torchvision:<builder>``.
        num_classes: number of output classes.
        bn_init: if given, every BatchNorm weight (gamma) is initialised to this
            value (network slimming uses 0.5); ``None`` keeps 1.0.
        in_channels: number of input channels.
    """
    _check_name(name)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    num_classes, in_channels = int(num_classes), int(in_channels)

    if name in _BUILTINS:
        model = _BUILTINS[name](num_classes=num_classes, in_channels=in_channels)
        init_weights(model)
    else:
        import torchvision

        builder = name[len(TORCHVISION_PREFIX):]
        model = torchvision.models.get_model(builder, weights=None, num_classes=num_classes)
        if in_channels != 3:
            _replace_first_conv(model, in_channels)

    if bn_init is not None:
        set_bn_weight(model, bn_init)
    return model
