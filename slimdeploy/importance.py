"""Which channels a plan keeps: the BN scores themselves, or the norm of every weight a group couples.

Network slimming ranks channels by |γ| (or proximal NS's ξ). Once pruning goes past the channels a
short sparse phase drove to zero, |γ| alone is a weak saliency: the filters that write a channel and
the input slices that read it are ignored. ``group_norm`` ranks a channel by those weights across its
whole coupled group (conv filters, BN γ, the next layers' input slices, every layer of a residual
stream), as Torch-Pruning's ``GroupNormPruner`` (DepGraph, Fang et al. 2023) does, using its
``GroupMagnitudeImportance``: per layer the sum of squared weights of the channel, averaged over the
group's layers and divided by the group's mean, so that groups of different size rank on one scale.
So a threshold on these scores is relative to the group's mean, not a value of γ. Torch-Pruning
counts no depthwise conv filters in it (their channels follow the group's other layers).
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from slimdeploy.graph import ChannelGroup
from slimdeploy.plan import zero_channels

IMPORTANCES = ("bn", "group_norm")


def group_norm_scores(model: nn.Module, graph: tp.DependencyGraph, groups: list[ChannelGroup],
                      bn_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-BN scores that rank channels by their group's weight norm, for the BNs of ``groups`` that
    ``bn_scores`` scores (the same value for every BN of a group: reduce them by ``max``).

    A channel every coupled BN scores exactly 0 keeps score 0: it feeds forward only its shift β, so it
    still goes first and is compensated exactly (see :func:`slimdeploy.plan.zero_channels`).
    """
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
    modules = dict(model.named_modules())
    out = {}
    for group in groups:
        root = modules[group.root]
        coupled = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                                          idxs=list(range(group.channels)))
        norm = importance(coupled).detach().float().cpu()
        norm[zero_channels(group, bn_scores)] = 0.0
        for slot in group.bns:
            if slot.name in bn_scores:
                scores = out.setdefault(slot.name, torch.zeros(modules[slot.name].num_features))
                scores[slot.bn_idxs] = norm[slot.root_idxs]
    return out


def ranking_scores(model: nn.Module, graph: tp.DependencyGraph, groups: list[ChannelGroup],
                   bn_scores: dict[str, torch.Tensor], importance: str) -> dict[str, torch.Tensor]:
    """The per-BN scores the plan ranks by: ``bn`` the BN scores as given, ``group_norm`` see above."""
    if importance == "bn":
        return bn_scores
    return group_norm_scores(model, graph, groups, bn_scores)
