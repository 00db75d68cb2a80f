"""The channel dependency graph (torch-pruning) and the prunable channel groups it implies.

A group is one set of channels that must go together: a conv's output channels plus every layer they
reach, across residual additions and concatenations. Each group is named by its root conv and lists the
BatchNorm layers whose γ belongs to it, with the index map from BN channel to root channel.
"""

from __future__ import annotations

import contextlib
import math
import traceback
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from slimdeploy.errors import ModelError, SlimdeployError
from slimdeploy.bn import is_affine_bn


class GraphError(SlimdeployError, RuntimeError):
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


class _OpaqueShuffle(torch.autograd.Function):
    """A channel shuffle as one autograd node, so tracing does not see its view/transpose/view."""

    @staticmethod
    def forward(ctx, x, groups, shuffle):
        ctx.groups, ctx.shuffle = groups, shuffle
        return shuffle(x, groups)

    @staticmethod
    def backward(ctx, grad):
        return ctx.shuffle(grad, grad.shape[1] // ctx.groups), None, None  # the inverse permutation


class _ShuffleLayer(nn.Module):
    """One channel shuffle, run as a layer of its own while the graph is traced.

    torch-pruning reads a shuffle's view/transpose/view as a flatten and fails, or maps channels
    wrongly; and no index map can express it, since the pruned shuffle is the same permutation only if
    both halves lose the same positions. As a layer whose input and output channels are separate, like
    a conv's, it ends every group that reaches it, and `channel_groups` leaves those groups out.
    """

    def __init__(self, shuffle):
        super().__init__()
        self.shuffle, self.channels = shuffle, None

    def forward(self, x, groups):
        self.channels = x.shape[1]
        return _OpaqueShuffle.apply(x, groups, self.shuffle)


class _ShufflePruner(tp.pruner.BasePruningFunc):
    """Never prunes: no group through a shuffle is planned."""

    def prune_out_channels(self, layer, idxs):
        return layer

    def prune_in_channels(self, layer, idxs):  # a separate function: input and output are not coupled
        return layer

    def get_out_channels(self, layer):
        return layer.channels

    def get_in_channels(self, layer):
        return layer.channels


@contextlib.contextmanager
def _shuffles_as_layers(model: nn.Module):
    """Run the channel shuffle of each torchvision ShuffleNetV2 block as a `_ShuffleLayer` child of the
    block; yields the customized pruners torch-pruning needs for them."""
    from torchvision.models import shufflenetv2

    blocks = [m for m in model.modules() if isinstance(m, shufflenetv2.InvertedResidual)]
    if not blocks:
        yield {}
        return
    shuffle, entered = shufflenetv2.channel_shuffle, []
    for block in blocks:
        block.add_module("trace_shuffle", _ShuffleLayer(shuffle))
    hooks = [block.register_forward_pre_hook(lambda block, args: entered.append(block)) for block in blocks]
    shufflenetv2.channel_shuffle = lambda x, groups: entered[-1].trace_shuffle(x, groups)
    try:
        yield {_ShuffleLayer: _ShufflePruner()}
    finally:
        shufflenetv2.channel_shuffle = shuffle
        for hook in hooks:
            hook.remove()
        for block in blocks:
            del block.trace_shuffle


def _crosses_shuffle(group) -> bool:
    return any(isinstance(item.dep.target.module, _ShuffleLayer) for item in group.items)


class _ReshapeShapes(TorchFunctionMode):
    """Records the input and output shape of every view/reshape result, by its autograd node (the
    node torch-pruning builds its reshape op from)."""

    def __init__(self):
        super().__init__()
        self.shapes = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        node = getattr(out, "grad_fn", None)
        reshape = node is not None and any(word in node.name().lower() for word in ("view", "reshape"))
        if reshape and args and isinstance(args[0], torch.Tensor):
            self.shapes[node] = (tuple(args[0].shape), tuple(out.shape))
        return out


def _keeps_channels(before: tuple, after: tuple) -> bool:
    """A reshape torch-pruning maps right: the channels (dim 1; a vector's only dim) untouched, or
    flattened with all that follows them."""
    if not before or not after:
        return True

    def channels(shape):
        return shape[1] if len(shape) > 1 else shape[0]

    flattened = len(after) == 2 and after == (before[0], math.prod(before[1:]))
    return channels(before) == channels(after) or flattened


def _check_reshapes(model: nn.Module, dg: tp.DependencyGraph, shapes: dict) -> None:
    """Refuse a reshape that regroups channels (a window partition, a channel shuffle): torch-pruning
    gives it a flatten's index map, which maps channels wrongly or makes groups explode."""
    for node in dg.module2node.values():
        if node.type == tp.ops.OPTYPE.RESHAPE and node.grad_fn in shapes:
            before, after = shapes[node.grad_fn]
            if not _keeps_channels(before, after):
                raise GraphError(f"cannot prune {type(model).__name__}: a reshape from {list(before)} to "
                                 f"{list(after)} regroups channels, which the dependency graph cannot map")


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    if not any(is_affine_bn(m) for m in model.modules()):
        raise ModelError(f"{type(model).__name__} has no BatchNorm layer with a learnable γ: network slimming "
                         f"needs BN scaling factors")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), _shuffles_as_layers(model) as pruners, _ReshapeShapes() as reshapes:
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False,
                                                       customized_pruners=pruners)
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1].name
        raise GraphError(f"cannot trace {type(model).__name__} for pruning: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''} (in {where})") from err
    finally:
        model.train(was_training)
    _check_reshapes(model, dg, reshapes.shapes)
    return dg


def channel_groups(model: nn.Module, dg: tp.DependencyGraph) -> list[ChannelGroup]:
    """Every prunable group that holds at least one BN (a group without one has no slimming score)
    and crosses no channel shuffle (see `_ShuffleLayer`)."""
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in dg.get_all_groups(ignored_layers=output_layers(model)):
        if _crosses_shuffle(group):
            continue
        root_module = group[0].dep.target.module
        slots: dict[str, BNSlot] = {}
        ch_groups = 1
        for item in group.items:
            module = item.dep.target.module
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _is_depthwise(module):
                ch_groups = math.lcm(ch_groups, module.groups)
            if is_affine_bn(module):
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
