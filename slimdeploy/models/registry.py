"""Model registry: build CIFAR models by name, or any torchvision classifier.

Names:
    ``vgg11, vgg13, vgg16, vgg19, resnet20, resnet56, resnet110, resnet164,
    densenet40`` - the built-in CIFAR (32x32) models;
    ``torchvision:<builder>`` - a torchvision classification builder (pretrained weights only from
    torch hub's cache: nothing is downloaded);
    ``package.module:factory`` or ``path/to/file.py:factory`` - a user's own model factory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from slimdeploy.bn import affine_bns, is_affine_bn
from slimdeploy.errors import ModelError
from slimdeploy.imports import is_import_path, resolve
from slimdeploy.registry import Registry

from . import cifar_densenet, cifar_resnet, cifar_vgg

TORCHVISION_PREFIX = "torchvision:"

# The built-in CIFAR models; torchvision:<builder> and factories' import paths are resolved beside them.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
for _builder in (cifar_vgg.vgg11, cifar_vgg.vgg13, cifar_vgg.vgg16, cifar_vgg.vgg19, cifar_resnet.resnet20,
                 cifar_resnet.resnet56, cifar_resnet.resnet110, cifar_resnet.resnet164, cifar_densenet.densenet40):
    MODELS.register(_builder.__name__)(_builder)

MODEL_NAMES: tuple[str, ...] = MODELS.names()


def model_choices() -> str:
    """What ``model.name`` may be, for error messages."""
    resolved = f"{TORCHVISION_PREFIX}<builder>, package.module:factory, path/to/file.py:factory"
    return f"{', '.join(MODELS.names())}, {resolved}"


def torchvision_builders() -> tuple[str, ...]:
    """Names of the torchvision classification builders (``torchvision.models``)."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def is_known_model(name: str) -> bool:
    """True if ``name`` is a built-in model or ``torchvision:<existing builder>``."""
    try:
        check_model_name(name)
    except ModelError:
        return False
    return not is_import_path(name)


def check_model_name(name: str) -> None:
    """ModelError unless ``name`` is a built-in model, ``torchvision:<existing builder>`` or an import path."""
    if not isinstance(name, str):
        raise ModelError(f"unknown model {name!r}; allowed: {model_choices()}")
    if name in MODELS or is_import_path(name):
        return
    if name.startswith(TORCHVISION_PREFIX):
        builder = name[len(TORCHVISION_PREFIX):]
        builders = torchvision_builders()
        if builder not in builders:
            raise ModelError(
                f"unknown torchvision builder {builder!r} in model {name!r}; "
                f"allowed builders: {', '.join(builders)}"
            )
        return
    raise ModelError(f"unknown model {name!r}; allowed: {model_choices()}")


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions, BN weight 1 / bias 0, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_affine_bn(m):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def set_bn_weight(model: nn.Module, value: float) -> int:
    """Fill every affine BatchNorm weight (gamma) with ``value``; returns the number of layers set."""
    count = 0
    with torch.no_grad():
        for m in affine_bns(model).values():
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


def _torchvision_weights(builder: str, weights: str):
    """torchvision's weights enum entry ``weights`` (``DEFAULT`` or a name like ``IMAGENET1K_V1``)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(builder)
    except (ValueError, KeyError):
        raise ModelError(f"model.weights: torchvision builder {builder!r} has no pretrained weights") from None
    if weights == "DEFAULT":
        return enum.DEFAULT
    if weights not in enum.__members__:
        raise ModelError(f"model.weights: {weights!r} is not a weights name of {builder}; "
                         f"allowed: DEFAULT, {', '.join(enum.__members__)}, or a state_dict file")
    return enum[weights]


def _torchvision_state_dict(builder: str, weights: str) -> dict:
    """The pretrained state_dict from torch hub's cache; nothing is downloaded."""
    entry = _torchvision_weights(builder, weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(entry.url).path).name
    if not cached.is_file():
        raise ModelError(f"model.weights: {builder} {entry} is not in torch hub's cache; "
                         f"put {entry.url} at {cached} (or set TORCH_HOME)")
    return load_state_dict_file(cached, "model.weights")


def load_state_dict_file(path, what: str = "model.weights") -> dict:
    """A state_dict from ``path``: the file itself, or a checkpoint holding one under ``state_dict`` or
    ``model``. Loaded with ``weights_only=True``: nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what}: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"{what}: {path} is not a weights_only-loadable torch file "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{what}: {path} holds no state_dict (a dict of tensors, or one under "
                         f"'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # saved from DDP


def load_weights(model: nn.Module, state_dict: dict, what: str = "model.weights") -> None:
    """Strict load; a mismatch is one line naming the first missing and unexpected keys or shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (first {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (first {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of other shape (first {shapes[0]})" if shapes else ""]
        raise ModelError(f"{what}: weights do not fit {type(model).__name__}: "
                         + "; ".join(p for p in parts if p))
    model.load_state_dict(state_dict)


def output_classes(model: nn.Module) -> int | None:
    """Outputs of the last Linear layer (None without one)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer for a freshly initialised one with ``num_classes`` outputs."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    model.set_submodule(name, new.to(old.weight.device, old.weight.dtype))


def _from_factory(name: str, kwargs: dict) -> nn.Module:
    factory = resolve(name, "model.name")
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise ModelError(f"model.name: {name}(**{kwargs}) raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.name: {name} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def build_model(
    name: str,
    num_classes: int,
    *,
    bn_init: float | None = None,
    in_channels: int = 3,
    kwargs: dict | None = None,
    weights: str | None = None,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: a built-in name (see ``MODEL_NAMES``), ``torchvision:<builder>``, or a user factory's
            import path ``package.module:factory`` / ``path/to/file.py:factory``.
        num_classes: number of output classes. With ``weights`` trained for another number, the last
            Linear layer is replaced by a new one (fine-tuning to new classes).
        bn_init: if given, every BatchNorm weight (gamma) is initialised to this value (network
            slimming uses 0.5); ``None`` keeps 1.0. Not applied over ``weights``.
        in_channels: number of input channels (built-in and torchvision models).
        kwargs: keyword arguments of the builder or factory.
        weights: a state_dict file (or a checkpoint with one under ``state_dict``/``model``), or for
            torchvision builders ``DEFAULT`` / a weights enum name, read from torch hub's cache.
    """
    kwargs = dict(kwargs or {})
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    num_classes, in_channels = int(num_classes), int(in_channels)
    pretrained = None
    check_model_name(name)
    if is_import_path(name):
        model = _from_factory(name, kwargs)
    else:
        if name in MODELS:
            model = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
            init_weights(model)
        else:
            import torchvision

            builder = name[len(TORCHVISION_PREFIX):]
            classes = num_classes
            if weights and is_weights_name(weights):  # the head the pretrained weights were trained with
                pretrained = _torchvision_state_dict(builder, weights)
                classes = len(_torchvision_weights(builder, weights).meta["categories"])
            model = torchvision.models.get_model(builder, weights=None, num_classes=classes, **kwargs)
            if in_channels != 3:
                _replace_first_conv(model, in_channels)
    if weights:
        load_weights(model, pretrained if pretrained is not None else load_state_dict_file(weights))
    classes = output_classes(model)
    if classes is not None and classes != num_classes:
        if not weights:
            raise ModelError(f"model.name: {name} outputs {classes} classes but the data has {num_classes}; "
                             f"set the factory's argument in model.kwargs")
        replace_classifier(model, num_classes)
    if bn_init is not None and not weights:
        set_bn_weight(model, bn_init)
    return model


def is_weights_name(weights: str) -> bool:
    """``DEFAULT`` or a torchvision weights enum name (``IMAGENET1K_V1``), as opposed to a file."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]*", weights) is not None and not Path(weights).exists()
