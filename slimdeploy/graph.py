"""The channel dependency graph (torch-pruning) and the prunable channel groups it implies.

A group is one set of channels that must go together: a conv's output channels plus every layer they
reach, across residual additions and concatenations. Each group is named by its root conv and lists the
BatchNorm layers whose γ belongs to it, with the index map from BN channel to root channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from slimdeploy.sparsity import BN_TYPES


class GraphError(RuntimeError):
    """The model cannot be traced or has nothing to prune."""


@dataclass
class BNSlot:
    name: str  # BN module name
    bn_idxs: list[int]  # channel indices in that BN ...
    root_idxs: list[int]  # ... and the root channels they belong to


@dataclass
class ChannelGroup:
    root: str  # name of the conv/linear whose output channels define the group
    channels: int
    bns: list[BNSlot]
    # Grouped convs (1 < groups, not depthwise) in the group: channel c = k·(channels/ch_groups) + j is
    # position j of conv group k, and every conv group must lose the same positions.
    ch_groups: int = 1


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The classifier: the last Linear (or, without one, the last conv); its outputs are never pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return [linears[-1]]
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return convs[-1:]


def _is_depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels  # one filter group per input channel (any multiplier)


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        raise GraphError(f"{type(model).__name__} has no BatchNorm layer: network slimming needs BN scaling factors")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as err:
        raise GraphError(f"cannot trace {type(model).__name__} for pruning: {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)


def channel_groups(model: nn.Module, dg: tp.DependencyGraph) -> list[ChannelGroup]:
    """Every prunable group that holds at least one BN (a group without one has no slimming score)."""
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in dg.get_all_groups(ignored_layers=output_layers(model)):
        root_module = group[0].dep.target.module
        slots: dict[str, BNSlot] = {}
        ch_groups = 1
        for item in group.items:
            module = item.dep.target.module
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _is_depthwise(module):
                ch_groups = math.lcm(ch_groups, module.groups)
            if isinstance(module, BN_TYPES) and module.weight is not None:
                name = names[module]
                slot = slots.setdefault(name, BNSlot(name, [], []))
                slot.bn_idxs.extend(int(i) for i in item.idxs)
                slot.root_idxs.extend(int(i) for i in item.root_idxs)
        if slots:
            channels = dg.get_out_channels(root_module)
            groups.append(ChannelGroup(names[root_module], int(channels), list(slots.values()), ch_groups))
    if not groups:
        raise GraphError(f"{type(model).__name__}: no prunable channel group holds a BatchNorm layer")
    return groups
