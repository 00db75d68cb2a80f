"""The BatchNorm layers network slimming works on: those with a learnable scale γ (``affine=True``).

Sparsity penalises these γ, the dependency graph scores channel groups by them and pruning zeroes or
removes their channels; a BN without γ has nothing to score.
"""

from __future__ import annotations

from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def is_affine_bn(module: nn.Module) -> bool:
    """True for a BatchNorm layer with a learnable γ."""
    return isinstance(module, BN_TYPES) and module.weight is not None


def affine_bns(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm layer with a learnable γ, by qualified name, in module order."""
    return {name: module for name, module in model.named_modules() if is_affine_bn(module)}
