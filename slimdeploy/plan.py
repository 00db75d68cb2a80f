"""Channel plans: from BN scores (|γ|, or |ξ| for proximal NS) to the channels each group loses.

Coupled BNs (all BNs on one residual stream, every consumer of a concatenated channel) share one
decision, made on a combined score per root channel (max over the coupled BNs by default). Modes:
``percent`` (one global ranking over all prunable channels, as in network slimming), ``threshold``
(scores below a value go), ``zeros`` (exactly the zero scores go: proximal NS) and ``latency`` (widths
chosen for a measured latency budget, see :mod:`slimdeploy.latency`). Every group keeps at least
``min_channels``; with ``round_to`` the kept widths are multiples of N.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimdeploy.graph import ChannelGroup
from slimdeploy.registry import Registry


@dataclass
class GroupPlan:
    root: str
    channels: int
    remove: list[int]
    bns: list[str]

    @property
    def kept(self) -> int:
        return self.channels - len(self.remove)


@dataclass
class ChannelPlan:
    """JSON-serialisable: with the model's name (a registry name or a factory's import path) and its
    factory's keyword arguments it rebuilds the pruned architecture."""

    model: str
    num_classes: int
    input_shape: list[int]
    how: str
    groups: list[GroupPlan]
    score_cut: float | None = None
    round_to: int | None = None
    biased: list[str] = field(default_factory=list)  # layers given a bias by BN-bias compensation
    bias_maps: dict[str, list[int]] = field(default_factory=dict)  # layers wrapped in a BiasMap, its shape
    notes: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)  # keyword arguments of the model's factory

    @property
    def channels_total(self) -> int:
        return sum(g.channels for g in self.groups)

    @property
    def channels_kept(self) -> int:
        return sum(g.kept for g in self.groups)

    def to_dict(self) -> dict:
        """Plain types only (str, int, float, list, dict): JSON- and ``weights_only``-safe."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ChannelPlan":
        raw = dict(raw)
        raw["groups"] = [GroupPlan(**g) for g in raw["groups"]]
        return cls(**raw)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "ChannelPlan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable channel plan ({type(err).__name__}: {err})") from None


def simd_block() -> int:
    """Channels per SIMD register of float32 on this CPU: 16 with AVX-512, 8 with AVX2, else 4."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 4
    if " avx512f" in flags:
        return 16
    if " avx2" in flags:
        return 8
    return 4


_REDUCE = {"max": torch.amax, "mean": torch.mean, "sum": torch.sum}


def group_scores(group: ChannelGroup, bn_scores: dict[str, torch.Tensor], reduce: str = "max") -> torch.Tensor:
    """One score per root channel, reduced over the coupled BNs that see it."""
    per_bn = torch.full((len(group.bns), group.channels), float("nan"), dtype=torch.float64)
    for row, slot in enumerate(group.bns):
        if slot.name not in bn_scores:  # a BN left out of the regularisation gives no evidence
            continue
        scores = bn_scores[slot.name].detach().double().cpu().abs()
        per_bn[row, slot.root_idxs] = scores[slot.bn_idxs]
    seen = ~per_bn.isnan()
    if reduce == "max":
        per_bn = per_bn.nan_to_num(float("-inf"))
    else:
        per_bn = per_bn.nan_to_num(0.0)
    out = _REDUCE[reduce](per_bn, dim=0)
    if reduce == "mean":
        out = out * len(group.bns) / seen.sum(0).clamp(min=1)
    # A root channel no BN sees (rare) has no slimming evidence: keep it.
    return torch.where(seen.any(0), out, torch.full_like(out, float("inf")))


def zero_channels(group: ChannelGroup, bn_scores: dict[str, torch.Tensor]) -> list[int]:
    """Root channels that every coupled BN scores exactly 0: they output only their shift β. A BN
    without a score (left out of the regularisation) keeps its channels varying, as does no BN at all."""
    zero, seen = torch.ones(group.channels, dtype=torch.bool), torch.zeros(group.channels, dtype=torch.bool)
    for slot in group.bns:
        seen[slot.root_idxs] = True
        if slot.name in bn_scores:
            zero[slot.root_idxs] &= bn_scores[slot.name].detach().cpu()[slot.bn_idxs] == 0
        else:
            zero[slot.root_idxs] = False
    return (zero & seen).nonzero().flatten().tolist()


def _round_kept(kept: int, channels: int, n: int | None, least: int) -> int:
    """The multiple of n nearest to ``kept`` (halves up), not below ``least`` nor above all channels.

    A layer of at most n channels fills one SIMD block whatever its width, so it keeps them all.
    """
    if not n:
        return kept
    rounded = max(n, n * math.floor(kept / n + 0.5))
    while rounded < least:
        rounded += n
    return min(rounded, channels)


# A plan mode marks, from the per-group scores and ``amount``, the channels each group loses; it returns
# those masks and the score cut (None where no single score separates kept from removed).
Removal = Callable[[list[torch.Tensor], float], tuple[list[torch.Tensor], float | None]]
PLAN_MODES: Registry[Removal] = Registry("plan mode")


@PLAN_MODES.register("percent", description="the amount share of all prunable channels, lowest scores first")
def _remove_percent(scores: list[torch.Tensor], amount: float):
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be a share in [0, 1) for how='percent', got {amount}")
    flat = torch.cat(scores)
    n_remove = int(amount * len(flat))
    order = torch.argsort(flat, stable=True)
    removed = torch.zeros(len(flat), dtype=torch.bool)
    removed[order[:n_remove]] = True
    cut = float(flat[order[n_remove]]) if n_remove < len(flat) else None
    return list(removed.split([len(s) for s in scores])), cut


@PLAN_MODES.register("threshold", description="channels scoring below amount")
def _remove_below(scores: list[torch.Tensor], amount: float):
    return [s < amount for s in scores], float(amount)


@PLAN_MODES.register("zeros", description="channels scoring exactly 0 (proximal NS)")
def _remove_zeros(scores: list[torch.Tensor], amount: float):
    return [s == 0 for s in scores], 0.0


def _remove_nothing(scores: list[torch.Tensor], amount: float):
    return [torch.zeros(len(s), dtype=torch.bool) for s in scores], None


PLAN_MODES.register("none", description="no channel")(_remove_nothing)
# latency's widths come from a measured budget (slimdeploy.latency) through make_plan's kept_widths
PLAN_MODES.register("latency", description="widths chosen for a measured latency budget")(_remove_nothing)


def make_plan(
    groups: list[ChannelGroup],
    bn_scores: dict[str, torch.Tensor],
    *,
    how: str = "percent",
    amount: float = 0.5,
    min_channels: int = 1,
    round_to: int | str | None = None,
    score_reduce: str = "max",
    model_name: str = "",
    model_kwargs: dict | None = None,
    num_classes: int = 0,
    input_shape: tuple[int, ...] = (),
    kept_widths: dict[str, int] | None = None,
) -> ChannelPlan:
    """Decide per group which channels go.

    ``how``: ``percent`` removes the ``amount`` share (in [0, 1)) of all prunable channels with the
    lowest scores; ``threshold`` those scoring below ``amount``; ``zeros`` those scoring exactly 0;
    ``none`` nothing; ``latency`` keeps the best-scoring ``kept_widths[root]`` channels of each group
    (widths chosen for a latency budget by :mod:`slimdeploy.latency`, already aligned).
    ``round_to`` (N, ``"auto"`` for the SIMD block, or None) aligns kept widths.
    ``model_name``/``model_kwargs`` record how to build the unpruned model, for rebuilding.
    """
    remove_channels = PLAN_MODES.get(how)
    if how == "latency" and set(kept_widths or ()) != {g.root for g in groups}:
        raise ValueError("how='latency' needs kept_widths: one kept width per group root")
    if score_reduce not in _REDUCE:
        raise ValueError(f"unknown score_reduce {score_reduce!r}; allowed: {', '.join(_REDUCE)}")
    scores = [group_scores(g, bn_scores, score_reduce) for g in groups]
    masks, cut = remove_channels(scores, amount)

    round_to = simd_block() if round_to == "auto" else round_to
    plans = []
    for group, score, remove in zip(groups, scores, masks):
        # Decide per position within a conv group (all positions when the group has no grouped conv).
        g = group.ch_groups
        positions = group.channels // g
        least = min(math.ceil(min_channels / g), positions)
        kept = max(positions - round(int(remove.sum()) / g), least)
        if how == "latency":
            kept = kept_widths[group.root] // g
        elif round_to and kept < positions:  # a group the plan leaves whole stays whole
            kept = _round_kept(kept, positions, round_to // math.gcd(round_to, g), least)
        # Keep the best positions; ties broken by index, so plans are deterministic.
        order = torch.argsort(-score.view(g, positions).amax(0), stable=True)
        drop = sorted(k * positions + int(j) for k in range(g) for j in order[kept:])
        plans.append(GroupPlan(group.root, group.channels, drop, [s.name for s in group.bns]))
    return ChannelPlan(
        model_name, num_classes, list(input_shape), how, plans, cut, round_to, model_kwargs=dict(model_kwargs or {}),
    )
