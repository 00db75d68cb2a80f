"""Apply a channel plan by physical removal (torch-pruning), with BN-bias compensation, and rebuild a
pruned model from its plan.

BN-bias compensation: a channel whose γ is (near) zero still outputs a constant, its BN shift β
(through the activation), and the next layers read it. Removing the channel drops that constant; we
fold it into the bias of every conv/linear that read the channel, so the pruned model computes what
the trained model with those γ set to zero computes. The folded value is the channel's mean input to
the consumer, measured on a calibration batch; it is exact wherever the channel is constant over the
feature map, that is everywhere except at zero-padded borders (and where a consumer reads a removed
channel without a BN in between, as the 1×1 shortcut of a pre-activation ResNet does).
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from slimdeploy.graph import ChannelGroup, build_graph
from slimdeploy.models import build_model
from slimdeploy.plan import ChannelPlan
from slimdeploy.sparsity import BN_TYPES

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def _plan_groups(model: nn.Module, dg, plan: ChannelPlan):
    """torch-pruning groups of the plan, all computed before any pruning (dense channel indices)."""
    for group in plan.groups:
        if group.remove:
            root = model.get_submodule(group.root)
            yield dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, group.remove)


def _removed_inputs(model: nn.Module, dg, plan: ChannelPlan):
    """Per BN, the channels to zero; per consumer conv/linear, the input channels it loses (dense indices)."""
    names = {m: n for n, m in model.named_modules()}
    bn_zero, consumer_inputs = defaultdict(set), defaultdict(set)
    for group in _plan_groups(model, dg, plan):
        out_pruned = {item.dep.target.module for item in group.items if dg.is_out_channel_pruning_fn(item.dep.handler)}
        for item in group.items:
            module = item.dep.target.module
            if isinstance(module, BN_TYPES) and module.weight is not None:
                bn_zero[names[module]].update(int(i) for i in item.idxs)
            elif (
                isinstance(module, _WEIGHTED)
                and module not in out_pruned  # a depthwise conv loses the channel on both sides
                and item.dep.handler == dg.get_pruner_of_module(module).prune_in_channels
            ):
                consumer_inputs[names[module]].update(int(i) for i in item.idxs)
    return bn_zero, consumer_inputs


@torch.no_grad()
def zero_removed_gammas(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """Set γ of every BN channel the plan removes to 0, β kept: the function compensation reproduces."""
    example = torch.randn(1, *plan.input_shape, device=next(model.parameters()).device)
    bn_zero, _ = _removed_inputs(model, build_graph(model, example), plan)
    for name, idxs in bn_zero.items():
        model.get_submodule(name).weight[sorted(idxs)] = 0
    return model


@torch.no_grad()
def _bias_deltas(model: nn.Module, bn_zero, consumer_inputs, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per consumer, what its removed inputs add to each output: Σ_c mean_input[c] · Σ_kernel W[:, c]."""
    zeroed = copy.deepcopy(model).eval()
    for name, idxs in bn_zero.items():
        zeroed.get_submodule(name).weight[sorted(idxs)] = 0
    means, hooks = {}, []
    for name, idxs in consumer_inputs.items():
        idx = torch.tensor(sorted(idxs))

        def hook(module, args, name=name, idx=idx):
            x = args[0].transpose(0, 1).flatten(1)  # channels first
            means[name] = x[idx.to(x.device)].double().mean(1)

        hooks.append(zeroed.get_submodule(name).register_forward_pre_hook(hook))
    zeroed(calibration)
    for h in hooks:
        h.remove()

    deltas = {}
    for name, idxs in consumer_inputs.items():
        layer = model.get_submodule(name)
        weight = layer.weight.detach().double()
        delta = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        groups = getattr(layer, "groups", 1)
        in_per, out_per = weight.shape[1], weight.shape[0] // groups
        for c, m in zip(sorted(idxs), means[name]):
            g = c // in_per
            rows = slice(g * out_per, (g + 1) * out_per)
            delta[rows] += m * weight[rows, c % in_per].reshape(out_per, -1).sum(1)
        deltas[name] = delta.to(layer.weight.dtype)
    return deltas


def _add_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(delta))
    with torch.no_grad():
        layer.bias += delta


def apply_plan(model: nn.Module, plan: ChannelPlan, calibration: torch.Tensor | None = None) -> nn.Module:
    """Remove the planned channels from ``model`` in place (and return it).

    With a ``calibration`` batch, the constants the removed channels fed forward are folded into the
    biases of their consumers, and ``plan.biased`` records the layers that gained a bias.
    """
    device = next(model.parameters()).device
    dg = build_graph(model, torch.randn(1, *plan.input_shape, device=device))
    deltas = {}
    if calibration is not None:
        bn_zero, consumer_inputs = _removed_inputs(model, dg, plan)
        deltas = _bias_deltas(model, bn_zero, consumer_inputs, calibration.to(device))
        plan.biased = sorted(n for n in deltas if model.get_submodule(n).bias is None)
    # Biases first: the surgery below then trims them with the consumers' own output channels.
    for name, delta in deltas.items():
        _add_bias(model.get_submodule(name), delta)
    for group in plan.groups:
        if group.remove:
            root = model.get_submodule(group.root)
            dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, group.remove).prune()
    return model


def rebuild_pruned(plan: ChannelPlan, state_dict: dict) -> nn.Module:
    """The pruned model from its plan and weights alone: no pickled modules."""
    model = build_model(plan.model, plan.num_classes)
    for name in plan.biased:
        layer = model.get_submodule(name)
        _add_bias(layer, torch.zeros(layer.weight.shape[0]))
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
    the masked model computes what the physically pruned one without compensation does.
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
