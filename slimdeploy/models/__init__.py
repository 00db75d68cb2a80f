"""Model zoo: CIFAR VGG / ResNet / pre-activation ResNet-164 / DenseNet-40, plus torchvision."""

from .cifar_densenet import CifarDenseNet
from .cifar_resnet import CifarResNet, PreResNet
from .cifar_vgg import VGG_CONFIGS, CifarVGG
from .registry import (
    MODEL_NAMES,
    TORCHVISION_PREFIX,
    build_model,
    get_classifier,
    init_weights,
    is_known_model,
    set_bn_weight,
    torchvision_builders,
)

__all__ = [
    "MODEL_NAMES",
    "TORCHVISION_PREFIX",
    "build_model",
    "is_known_model",
    "get_classifier",
    "init_weights",
    "set_bn_weight",
    "torchvision_builders",
    "CifarVGG",
    "CifarResNet",
    "PreResNet",
    "CifarDenseNet",
    "VGG_CONFIGS",
]
