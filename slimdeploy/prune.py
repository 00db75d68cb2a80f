"""Apply a channel plan by physical removal (torch-pruning), and rebuild a pruned model from its plan."""

from __future__ import annotations

import torch
from torch import nn

from slimdeploy.graph import ChannelGroup, build_graph
from slimdeploy.models import build_model
from slimdeploy.plan import ChannelPlan


def apply_plan(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """Remove the planned channels from ``model`` in place (and return it)."""
    device = next(model.parameters()).device
    example = torch.randn(1, *plan.input_shape, device=device)
    dg = build_graph(model, example)
    for group in plan.groups:
        if not group.remove:
            continue
        root = model.get_submodule(group.root)
        pruner = dg.get_pruner_of_module(root)
        dg.get_pruning_group(root, pruner.prune_out_channels, group.remove).prune()
    return model


def rebuild_pruned(plan: ChannelPlan, state_dict: dict) -> nn.Module:
    """The pruned model from its plan and weights alone: no pickled modules."""
    model = build_model(plan.model, plan.num_classes)
    apply_plan(model, plan)
    model.load_state_dict(state_dict)
    return model


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
    return widths


@torch.no_grad()
def mask_plan(model: nn.Module, groups: list[ChannelGroup], plan: ChannelPlan) -> nn.Module:
    """The reference implementations' way: zero γ and β of every BN channel the plan removes.

    ``groups`` come from the same (unpruned) model. Where a removed channel is read only through BNs,
    the masked model computes what the physically pruned one does.
    """
    slots = {g.root: g.bns for g in groups}
    for group in plan.groups:
        removed = set(group.remove)
        for slot in slots[group.root]:
            bn = model.get_submodule(slot.name)
            idx = [b for b, r in zip(slot.bn_idxs, slot.root_idxs) if r in removed]
            bn.weight[idx] = 0
            bn.bias[idx] = 0
    return model
