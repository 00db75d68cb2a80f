"""Which channels a plan keeps: the BN scores themselves, the norm of every weight a group couples, or
the loss change a first-order Taylor expansion predicts for removing each channel.

Network slimming ranks channels by |γ| (or proximal NS's ξ). Once pruning goes past the channels a
short sparse phase drove to zero, |γ| alone is a weak saliency: the filters that write a channel and
the input slices that read it are ignored. ``group_norm`` ranks a channel by those weights across its
whole coupled group (conv filters, BN γ, the next layers' input slices, every layer of a residual
stream), as Torch-Pruning's ``GroupNormPruner`` (DepGraph, Fang et al. 2023) does, using its
``GroupMagnitudeImportance``: per layer the sum of squared weights of the channel, averaged over the
group's layers and divided by the group's mean, so that groups of different size rank on one scale.
So a threshold on these scores is relative to the group's mean, not a value of γ. Torch-Pruning
counts no depthwise conv filters in it (their channels follow the group's other layers).

``taylor`` ranks a channel by the loss change that removing it predicts to first order, from gradients on
labelled batches: per batch, the sum over its coupled BNs of γ·∂L/∂γ + β·∂L/∂β (removing the channel
sets both to 0), squared, averaged over the batches. This is Molchanov et al.'s Taylor-FO-BN criterion
(CVPR 2019), as HALP (Shen et al. 2022) uses it for its latency knapsack. Unlike |γ|, whose scale
differs from layer to layer, it is in units of loss everywhere, so a knapsack can weigh channels of
different groups against each other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from slimdeploy.errors import InputError
from slimdeploy.graph import ChannelGroup
from slimdeploy.plan import zero_channels

IMPORTANCES = ("bn", "group_norm", "taylor")


def _per_bn(model: nn.Module, groups: list[ChannelGroup], values: list[torch.Tensor],
            bn_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-BN scores carrying each group's per-channel ``values`` (the same for every BN of a group:
    reduce them by ``max``), for the BNs that ``bn_scores`` scores. A channel every coupled BN scores
    exactly 0 keeps score 0: it feeds forward only its shift β, so it still goes first and is
    compensated exactly (see :func:`slimdeploy.plan.zero_channels`)."""
    modules = dict(model.named_modules())
    out = {}
    for group, value in zip(groups, values):
        value = value.detach().float().cpu()
        value[zero_channels(group, bn_scores)] = 0.0
        for slot in group.bns:
            if slot.name in bn_scores:
                scores = out.setdefault(slot.name, torch.zeros(modules[slot.name].num_features))
                scores[slot.bn_idxs] = value[slot.root_idxs]
    return out


def group_norm_scores(model: nn.Module, graph: tp.DependencyGraph, groups: list[ChannelGroup],
                      bn_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-BN scores that rank channels by their group's weight norm (see :func:`_per_bn`)."""
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
    modules = dict(model.named_modules())
    norms = []
    for group in groups:
        root = modules[group.root]
        coupled = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                                          idxs=list(range(group.channels)))
        norms.append(importance(coupled))
    return _per_bn(model, groups, norms, bn_scores)


def taylor_scores(model: nn.Module, groups: list[ChannelGroup], bn_scores: dict[str, torch.Tensor],
                  batches: Iterable, loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """Per-BN scores that rank channels by their first-order loss change (see the module docstring and
    :func:`_per_bn`), from ``batches`` of (inputs, targets) and ``loss_fn(outputs, targets)`` (default:
    cross entropy). The model is evaluated in eval mode, as it is deployed; it is not modified."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    probe = copy.deepcopy(model).eval()
    coupled = {slot.name for group in groups for slot in group.bns}
    bns = {name: m for name, m in probe.named_modules() if name in coupled and getattr(m, "weight", None) is not None}
    params = [p.requires_grad_(True) for bn in bns.values() for p in (bn.weight, bn.bias)]
    device = params[0].device if params else torch.device("cpu")
    squares = [torch.zeros(group.channels, dtype=torch.float64) for group in groups]
    count = 0
    for inputs, targets in batches:
        grads = iter(torch.autograd.grad(loss_fn(probe(inputs.to(device)), targets.to(device)), params))
        change_per_bn = {name: (bn.weight * next(grads) + bn.bias * next(grads)).detach().double().cpu()
                         for name, bn in bns.items()}
        for square, group in zip(squares, groups):
            change = torch.zeros(group.channels, dtype=torch.float64)
            for slot in group.bns:  # removing the channel removes it from every coupled BN at once
                if slot.name in change_per_bn:
                    change[slot.root_idxs] += change_per_bn[slot.name][slot.bn_idxs]
            square += change**2
        count += 1
    if count == 0:
        raise InputError("taylor_batches is empty: give at least one (inputs, targets) batch")
    return _per_bn(model, groups, [square / count for square in squares], bn_scores)


def ranking_scores(model: nn.Module, graph: tp.DependencyGraph, groups: list[ChannelGroup],
                   bn_scores: dict[str, torch.Tensor], importance: str, taylor_batches: Iterable | None = None,
                   taylor_loss: Callable | None = None) -> dict[str, torch.Tensor]:
    """The per-BN scores the plan ranks by: ``bn`` the BN scores as given, ``group_norm`` and ``taylor``
    see above."""
    if importance == "bn":
        return bn_scores
    if importance == "taylor":
        return taylor_scores(model, groups, bn_scores, taylor_batches, taylor_loss)
    return group_norm_scores(model, graph, groups, bn_scores)
