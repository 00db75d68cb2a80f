"""Apply a channel plan by physical removal (torch-pruning), with BN-bias compensation, and rebuild a
pruned model from its plan.

BN-bias compensation: a channel whose γ is (near) zero still outputs a constant, its BN shift β
(through the activation), and the next layers read it. Removing the channel drops that constant; we
add what it contributed to every conv/linear that read it (measured as the channel's mean input on a
calibration batch): as a bias where the contribution is uniform, as a per-position BiasMap where zero
padding makes it vary at the borders. The pruned model then computes what the trained model with
those γ set to zero computes, exactly wherever every read of a removed channel passes a BN (not so
where a consumer reads it raw, as the 1×1 shortcut of a pre-activation ResNet does).

Maps are for channels that were zero already (score 0, e.g. proximal NS's ξ): only there is the
γ-zeroed model the trained one. A channel pruned past the zeros still varied, so a fixed map would
freeze a border pattern the network never computed (and add an Add per layer); it gets the bias alone.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict

import torch
import torch_pruning as tp
from torch import nn

from slimdeploy.bn import is_affine_bn
from slimdeploy.errors import ModelError
from slimdeploy.graph import ChannelGroup, build_graph
from slimdeploy.imports import is_import_path, resolve
from slimdeploy.models import build_model
from slimdeploy.outputs import aux_heads, drop_aux_heads
from slimdeploy.plan import ChannelPlan

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def _plan_groups(model: nn.Module, dg, plan: ChannelPlan):
    """torch-pruning groups of the plan (dense channel indices while nothing has been pruned yet)."""
    for group in plan.groups:
        if group.remove:
            root = model.get_submodule(group.root)
            yield dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, group.remove)


def _removed_inputs(model: nn.Module, dg, plan: ChannelPlan):
    """Dense channel indices the plan removes: per BN (to zero), per consumer conv/linear its lost
    inputs, and per conv/linear its lost outputs."""
    names = {m: n for n, m in model.named_modules()}
    bn_zero, inputs, outputs = defaultdict(set), defaultdict(set), defaultdict(set)
    for group in _plan_groups(model, dg, plan):
        for item in group.items:
            module, handler = item.dep.target.module, item.dep.handler
            idxs = (int(i) for i in item.idxs)
            if is_affine_bn(module):
                bn_zero[names[module]].update(idxs)
            # A depthwise conv's input pruning is its output pruning: it loses whole channels, reads none.
            elif isinstance(module, _WEIGHTED) and handler == dg.get_pruner_of_module(module).prune_out_channels:
                outputs[names[module]].update(idxs)
            elif isinstance(module, _WEIGHTED) and dg.is_in_channel_pruning_fn(handler):
                # also when the same group takes its outputs (a pointwise conv after a depthwise one on
                # the residual stream): its kept outputs still read the removed inputs
                inputs[names[module]].update(idxs)
    return bn_zero, inputs, outputs


def removed_bn_channels(model: nn.Module, graph: tp.DependencyGraph, plan: ChannelPlan) -> dict[str, list[int]]:
    """Per affine BN, the channels the plan removes (indices of the unpruned model)."""
    bn_zero, _, _ = _removed_inputs(model, graph, plan)
    return {name: sorted(idxs) for name, idxs in bn_zero.items()}


@torch.no_grad()
def zero_bn_channels(model: nn.Module, channels: dict[str, list[int]]) -> nn.Module:
    """Set γ of the given BN channels to 0 (β kept), in place."""
    for name, idxs in channels.items():
        model.get_submodule(name).weight[sorted(idxs)] = 0
    return model


def plan_graph(model: nn.Module, plan: ChannelPlan) -> tp.DependencyGraph:
    """The dependency graph of ``model``, traced at the input shape ``plan`` was made for."""
    return build_graph(model, torch.randn(1, *plan.input_shape, device=next(model.parameters()).device))


def zero_removed_gammas(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """Set γ of every BN channel the plan removes to 0, β kept: the function compensation reproduces."""
    return zero_bn_channels(model, removed_bn_channels(model, plan_graph(model, plan), plan))


@torch.no_grad()
def _constant_inputs(model: nn.Module, bn_zero, inputs, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per consumer, its removed inputs as constants (the rest zero), one sample [1, C, ...]: their mean
    values on the calibration batch of the γ-zeroed model."""
    zeroed = zero_bn_channels(copy.deepcopy(model).eval(), bn_zero)
    constant_inputs, hooks = {}, []
    for name, idxs in inputs.items():
        idx = torch.tensor(sorted(idxs))

        def hook(module, args, name=name, idx=idx):
            x = args[0]
            means = x.transpose(0, 1).flatten(1)[idx.to(x.device)].mean(1)
            z = torch.zeros_like(x[:1])
            z[0, idx.to(x.device)] = means.view(-1, *([1] * (x.dim() - 2)))
            constant_inputs[name] = z

        hooks.append(zeroed.get_submodule(name).register_forward_pre_hook(hook))
    zeroed(calibration)
    for h in hooks:
        h.remove()
    return constant_inputs


@torch.no_grad()
def _contribution(layer: nn.Module, constant_input: torch.Tensor) -> torch.Tensor:
    """What a constant input adds to the layer's output: the layer applied without its bias. For a conv
    this is a map [out, H, W]: constant inside, different where zero padding cuts the kernel."""
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(constant_input, layer.weight)[0]
    return layer._conv_forward(constant_input, layer.weight, None)[0]


def _only(constant_input: torch.Tensor, idxs) -> torch.Tensor:
    """The constant input restricted to channels ``idxs``."""
    kept = torch.zeros_like(constant_input)
    idx = sorted(idxs)
    kept[:, idx] = constant_input[:, idx]
    return kept


class BiasMap(nn.Module):
    """A layer plus a constant per-position map: the exact contribution of removed constant channels
    through a zero-padded conv (ties the layer to the input size it was measured at)."""

    def __init__(self, layer: nn.Module, bias_map: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.bias_map


def _add_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(delta))
    with torch.no_grad():
        layer.bias += delta


def _interior(contribution: torch.Tensor) -> torch.Tensor:
    """Per output channel, the value away from the borders (the centre position of a map)."""
    if contribution.dim() == 1:
        return contribution
    return contribution[(slice(None), *(size // 2 for size in contribution.shape[1:]))]


def _is_uniform(contribution: torch.Tensor) -> bool:
    if contribution.dim() == 1:
        return True
    flat = contribution.flatten(1)
    return bool((flat - flat.mean(1, keepdim=True)).abs().max() <= 1e-6 * (1 + flat.abs().max()))


def _zeros_only(plan: ChannelPlan, zero_channels: dict[str, list[int]]) -> ChannelPlan:
    """The plan restricted to the removed channels that are zeros."""
    groups = [dataclasses.replace(g, remove=sorted(set(g.remove) & set(zero_channels.get(g.root, ()))))
              for g in plan.groups]
    return dataclasses.replace(plan, groups=groups)


def apply_plan(
    model: nn.Module,
    plan: ChannelPlan,
    calibration: torch.Tensor | None = None,
    exact: bool = True,
    graph: tp.DependencyGraph | None = None,
    zero_channels: dict[str, list[int]] | None = None,
) -> nn.Module:
    """Remove the planned channels from ``model`` in place (and return it).

    With a ``calibration`` batch, what the removed channels fed forward is compensated: as a bias where
    it is uniform over the feature map, and, with ``exact``, as a :class:`BiasMap` where zero padding
    makes it vary at the borders (else as the bias of the interior). ``zero_channels`` (per group root)
    names the removed channels that output only their shift β; maps are built from these alone, the
    others give their interior bias. None means every removed channel is such a zero.
    ``plan.biased`` and ``plan.bias_maps`` record the layers changed, so :func:`rebuild_pruned` can
    rebuild them. Auxiliary classifiers (torchvision GoogLeNet, Inception v3) are removed.
    ``graph`` is the model's dependency graph, if already traced.
    """
    device = next(model.parameters()).device
    dg = graph or plan_graph(model, plan)
    maps = {}
    if calibration is not None:
        bn_zero, inputs, outputs = _removed_inputs(model, dg, plan)
        if zero_channels is not None:
            _, zero_inputs, _ = _removed_inputs(model, dg, _zeros_only(plan, zero_channels))
        else:
            zero_inputs = inputs
        biased = []
        # Biases before the surgery, which then trims them with the consumers' own output channels;
        # maps after it, trimmed here.
        for name, constant in _constant_inputs(model, bn_zero, inputs, calibration.to(device)).items():
            layer, zeros = model.get_submodule(name), zero_inputs.get(name, set())
            from_zeros = _contribution(layer, _only(constant, zeros))
            rest = _contribution(layer, constant) - from_zeros
            if exact and not _is_uniform(from_zeros):
                maps[name] = from_zeros[[o for o in range(from_zeros.shape[0]) if o not in outputs[name]]]
                if not inputs[name] - zeros:  # nothing left for a bias
                    continue
                delta = _interior(rest)
            else:
                delta = _interior(from_zeros + rest)
            if layer.bias is None:
                biased.append(name)
            _add_bias(layer, delta)
        plan.biased = sorted(biased)
        plan.bias_maps = {name: list(m.shape) for name, m in sorted(maps.items())}
    for group in _plan_groups(model, dg, plan):  # each group is formed just before it is pruned
        group.prune()
    drop_aux_heads(model)  # train-only heads the eval-mode graph never saw, so they were not pruned
    for name, bias_map in maps.items():
        model.set_submodule(name, BiasMap(model.get_submodule(name), bias_map))
    return model


def rebuild_pruned(plan: ChannelPlan, state_dict: dict, build=None) -> nn.Module:
    """The pruned model from its plan and weights alone: no pickled modules.

    The unpruned model comes from ``build`` (a callable, or a factory's import path called with the
    plan's ``model_kwargs``) or else from the plan: a registry name, a torchvision builder, or the import
    path of an ``nn.Module`` subclass. A plan naming any other callable needs ``build``, so that a
    swapped file cannot make this call a function of its choice.
    """
    model = unpruned_model(plan, build)
    for name in plan.biased:
        layer = model.get_submodule(name)
        _add_bias(layer, torch.zeros(layer.weight.shape[0]))
    apply_plan(model, plan)
    for name, shape in plan.bias_maps.items():
        model.set_submodule(name, BiasMap(model.get_submodule(name), torch.zeros(shape)))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ModelError(f"the pruned weights do not fit the model the plan builds ({str(err).splitlines()[0]})") from None
    return model


def unpruned_model(plan: ChannelPlan, build=None) -> nn.Module:
    """The model the plan was made for, before pruning (see :func:`rebuild_pruned`)."""
    if callable(build):
        model = build()
    elif build is not None or not is_import_path(plan.model):
        model = build_model(build or plan.model, plan.num_classes, kwargs=plan.model_kwargs)
    else:
        factory = resolve(plan.model, "plan model")
        if not (isinstance(factory, type) and issubclass(factory, nn.Module)):
            raise ModelError(f"the plan names the factory {plan.model!r}; pass build={plan.model!r} (or a "
                             f"callable) to trust it and build the unpruned model")
        model = factory(**plan.model_kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"build returned a {type(model).__name__}, not a torch nn.Module")
    return model


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer, outside auxiliary classifiers (pruning drops them)."""
    widths = {}
    wrapped = {f"{n}.layer" for n, m in model.named_modules() if isinstance(m, BiasMap)}
    aux = tuple(f"{name}." for name in aux_heads(model))
    for name, m in model.named_modules():
        if name in wrapped or name.startswith(aux):
            continue
        if isinstance(m, BiasMap):  # listed under the wrapped layer's own name
            m = m.layer
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
