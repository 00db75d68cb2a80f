"""The library API, for a user's own model, data and training loop (``import slimdeploy as sd``).

    handle = sd.sparsify(model, optimizer, method="proximal", penalty="l1", lam=1e-4)
    ...                                      # the user's own loop, unchanged
    pruned, plan = sd.prune(model, example_inputs, scores=handle.scores(), amount=0.5, round_to="auto")
    sd.save_pruned("pruned.pt", pruned, plan); model = sd.load_pruned("pruned.pt")
    sd.export_onnx(pruned, "pruned.onnx", example_inputs)
    sd.benchmark(["dense.onnx", "pruned.onnx"])

The recipe pipeline is a composition of these same calls.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimdeploy import latency, ortbench
from slimdeploy.errors import InputError
from slimdeploy.export import ExportCheck, verify_onnx
from slimdeploy.export import export_onnx as _export
from slimdeploy.graph import build_graph, channel_groups
from slimdeploy.importance import IMPORTANCES, ranking_scores
from slimdeploy.models.registry import output_classes
from slimdeploy.plan import ChannelPlan, group_scores, make_plan, simd_block, zero_channels
from slimdeploy.prune import apply_plan, plan_graph, rebuild_pruned, removed_bn_channels
from slimdeploy.sparsity import Sparsifier, make_sparsifier, select_bns

COMPENSATIONS = ("exact", "bias", "none")
PRUNED_FORMAT = "slimdeploy.pruned/1"


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str = "subgradient",
    penalty: str = "l1",
    lam: float = 1e-4,
    *,
    p: float = 0.5,
    a: float | None = None,
    beta: float = 100.0,
    include=(),
    exclude=(),
    plan: ChannelPlan | None = None,
) -> Sparsifier:
    """Put a sparsity penalty on the BN γ of ``model`` (plain or DDP-wrapped) by hooking ``optimizer``.

    ``method``: ``subgradient`` (adds λ∂p(γ) to the gradients before each step), ``proximal`` (proximal
    NS: γ/ξ splitting with coupling ``beta``; ξ reaches exact zeros) or ``prox_sgd`` (prox on γ after each
    step). ``penalty``: ``l1``, ``lp`` (exponent ``p``), ``tl1``, ``mcp``, ``scad`` (``a``; None: the
    penalty's default). ``include``/``exclude``: fnmatch patterns of BN module names. ``plan``: penalise
    only the BN channels this plan (of :func:`prune`, made on ``model`` before training) removes, and let
    the rest train freely; with ``proximal`` their ξ reach exact zeros, their γ and shift β are then held
    at 0, and ``prune(..., plan=plan)`` afterwards removes channels that output 0. The learning rate is
    read from γ's param group at every step; a step a GradScaler skips is skipped here too.

    Returns the handle: ``.scores()`` (per-BN channel scores for :func:`prune`), ``.state_dict()`` /
    ``.load_state_dict()`` (ξ of proximal NS, for checkpoints), ``.remove()`` (detach the hooks).
    """
    channels = None if plan is None else plan_bn_channels(model, plan)
    sparsifier = make_sparsifier(model, method, penalty, lam, p=p, a=a, beta=beta, include=include, exclude=exclude,
                                 channels=channels)
    return sparsifier.attach(optimizer)


def plan_bn_channels(model: nn.Module, plan: ChannelPlan) -> dict[str, list[int]]:
    """Per affine BN of ``model``, the channels ``plan`` removes (indices of the unpruned model)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    graph = plan_graph(model, plan)
    check_plan_fits(plan, channel_groups(model, graph))
    return removed_bn_channels(model, graph, plan)


def check_plan_fits(plan: ChannelPlan, groups) -> None:
    """InputError unless ``plan`` was made for a model with these channel groups."""
    have = {g.root: g.channels for g in groups}
    want = {g.root: g.channels for g in plan.groups}
    if have != want:
        differ = sorted(set(have.items()) ^ set(want.items()))
        raise InputError(f"plan: made for other channel groups than this model has (first difference: "
                         f"{differ[0][0]}); pass a plan made on this architecture")


@dataclass
class PruneOutcome:
    model: nn.Module
    plan: ChannelPlan
    zeroed_bn_channels: dict[str, list[int]]  # per BN, the channels the plan removes (dense indices)


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    scores=None,
    how: str = "percent",
    amount: float = 0.5,
    round_to: int | str | None = None,
    min_channels: int = 1,
    compensate: str = "exact",
    calibration: torch.Tensor | None = None,
    *,
    score_reduce: str = "max",
    importance: str = "bn",
    model_name: str | None = None,
    model_kwargs: dict | None = None,
    target_speedup: float | None = None,
    target_ms: float | None = None,
    latency_fit: str = "within",
    latency_table=None,
    latency_batch: int = 1,
    latency_threads: int = 1,
    taylor_batches=None,
    taylor_loss=None,
    plan: ChannelPlan | None = None,
) -> tuple[nn.Module, ChannelPlan]:
    """Physically remove channels from a copy of ``model``; returns ``(pruned_model, plan)``.

    ``example_inputs``: a batch [N, C, H, W] of the input size the model is deployed at (the graph is
    traced with it, once). ``scores``: per-BN channel scores (a dict, or the handle of :func:`sparsify`);
    None means |γ| of every affine BN. ``how``/``amount``: ``percent`` removes the ``amount`` share of the
    lowest-scoring channels, ``threshold`` those below ``amount``, ``zeros`` those scoring exactly 0
    (proximal NS), ``latency`` keeps the most score within a latency budget measured in onnxruntime on
    this machine (``target_speedup`` over the dense model, or ``target_ms``, at ``latency_batch`` and
    ``latency_threads``; ``latency_fit``: measured ``within`` ±5 % of the target, or ``at_most`` the
    target latency and within 5 % of it, for a budget the model must not exceed; the per-layer
    ``latency_table`` JSON is cached, by default under ~/.cache/slimdeploy/latency/; see
    :mod:`slimdeploy.latency`).
    ``round_to``: kept widths a multiple of N (``"auto"``: the CPU's SIMD block; for a latency target
    out of reach at that alignment, halved down to 4 with a warning, unless ``latency_table`` is given).
    ``compensate``: what removed channels still fed forward (their BN shift β) is folded into the next
    layers: ``exact`` (a bias, plus per-position maps where zero padding makes it vary, for channels
    scoring 0; fixes the input size), ``bias`` or ``none``; measured on ``calibration`` (default
    ``example_inputs``). Channels pruned past the zeros still varied: they get the bias alone.
    ``importance``: what ranks the channels: ``bn``, the scores themselves; ``group_norm``, the squared
    norm of every weight tied to the channel across its coupled group over the group's mean (DepGraph's),
    with channels scoring exactly 0 still first; ``taylor``, the loss change a first-order Taylor
    expansion predicts for removing the channel from every coupled BN (Taylor-FO-BN, as HALP's latency
    knapsack uses it), from ``taylor_batches``: labelled (inputs, targets) batches, read once (an
    iterable; about 10,000 training images keep the plan steady), and ``taylor_loss(outputs, targets)``
    (default cross entropy); channels scoring exactly 0 still first (see :mod:`slimdeploy.importance`).
    ``model_name``/``model_kwargs``: how :func:`load_pruned` builds the unpruned model (default: the
    model's class, called with no arguments). ``plan``: remove exactly the channels of this plan, made
    earlier on the same architecture (e.g. the latency plan :func:`sparsify` trained toward), instead of
    planning; ``scores`` then only say which removed channels are zeros, for compensation.
    ``model`` itself is not modified.
    """
    outcome = prune_with_record(model, example_inputs, scores, how, amount, round_to, min_channels, compensate,
                                calibration, score_reduce=score_reduce, importance=importance, model_name=model_name,
                                model_kwargs=model_kwargs, target_speedup=target_speedup, target_ms=target_ms,
                                latency_fit=latency_fit, latency_table=latency_table, latency_batch=latency_batch,
                                latency_threads=latency_threads, taylor_batches=taylor_batches,
                                taylor_loss=taylor_loss, plan=plan)
    return outcome.model, outcome.plan


def prune_with_record(model, example_inputs, scores=None, how="percent", amount=0.5, round_to=None,
                      min_channels=1, compensate="exact", calibration=None, *, score_reduce="max",
                      importance="bn", model_name=None, model_kwargs=None, target_speedup=None, target_ms=None,
                      latency_fit="within", latency_table=None, latency_batch=1, latency_threads=1,
                      taylor_batches=None, taylor_loss=None, plan=None) -> PruneOutcome:
    """:func:`prune`, also returning which BN channels the plan removed (for measuring compensation)."""
    latency.check_fit(latency_fit)
    if plan is not None and not isinstance(plan, ChannelPlan):
        raise InputError(f"plan must be a ChannelPlan (sd.prune's second result), got {type(plan).__name__}")
    if how == "latency":
        latency.check_targets(target_speedup, target_ms)
    elif target_speedup is not None or target_ms is not None:
        raise InputError(f"target_speedup and target_ms are for how='latency', not how={how!r}")
    if importance not in IMPORTANCES:
        raise InputError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    if importance != "bn" and score_reduce != "max":
        raise InputError(f"score_reduce {score_reduce!r} applies to importance='bn'; {importance} already "
                         "covers every layer of a group, so leave score_reduce at 'max'")
    if importance == "taylor" and taylor_batches is None and plan is None:
        raise InputError("importance='taylor' needs taylor_batches: labelled (inputs, targets) batches")
    if importance != "taylor" and taylor_batches is not None:
        raise InputError(f"taylor_batches is for importance='taylor', not importance={importance!r}")
    if compensate not in COMPENSATIONS:
        raise InputError(f"compensate must be one of {', '.join(COMPENSATIONS)}, got {compensate!r}")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
        raise InputError("example_inputs must be a batch tensor [N, C, ...] at the deployed input size")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    pruned = copy.deepcopy(model)
    device = next(pruned.parameters()).device
    example_inputs = example_inputs.to(device)
    graph = build_graph(pruned, example_inputs[:1])
    if scores is None:
        scores = {name: bn.weight.detach().abs() for name, bn in select_bns(pruned).items()}
    elif hasattr(scores, "scores"):
        scores = scores.scores()
    groups = channel_groups(pruned, graph)
    if compensate != "none":
        calibration = (example_inputs if calibration is None else calibration).to(device)
    if plan is not None:
        check_plan_fits(plan, groups)
        return _prune_by(pruned, graph, groups, scores, copy.deepcopy(plan), compensate, calibration)
    scores = ranking_scores(pruned, graph, groups, scores, importance, taylor_batches, taylor_loss)
    if model_name is None:
        model_name = f"{type(model).__module__}:{type(model).__qualname__}"
    plan_kwargs = dict(how=how, amount=amount, min_channels=min_channels, round_to=round_to,
                       score_reduce=score_reduce, model_name=model_name, model_kwargs=model_kwargs,
                       num_classes=output_classes(model) or 0, input_shape=tuple(example_inputs.shape[1:]))
    if how != "latency":
        outcome = _prune_traced(pruned, graph, scores, plan_kwargs, compensate, calibration, groups)
    else:
        # "auto" starts at the SIMD block and halves it while the target is out of reach: a narrower
        # alignment runs slower per channel but lets every group shrink further. A given table was
        # measured (maybe on another device) for the widths of one alignment, so it gets the block only.
        if round_to != "auto":
            alignments = [round_to]
        else:
            alignments = auto_alignments() if latency_table is None else [simd_block()]
        values = [group_scores(g, scores, score_reduce) for g in groups]
        for align, narrower in zip(alignments, alignments[1:] + [None]):
            def prune_to_widths(kept_widths: dict, align=align) -> PruneOutcome:
                copied = copy.deepcopy(model)
                return _prune_traced(copied, build_graph(copied, example_inputs[:1]), scores,
                                     {**plan_kwargs, "round_to": align, "kept_widths": kept_widths},
                                     compensate, calibration)

            try:
                outcome = latency.fit_to_latency(
                    pruned, example_inputs, graph, groups, values, prune_to_widths, target_speedup=target_speedup,
                    target_ms=target_ms, round_to=align, min_channels=min_channels, batch=latency_batch,
                    threads=latency_threads, table_path=latency_table, fit=latency_fit,
                )
                break
            except latency.OutOfReach as err:
                if narrower is None:
                    raise
                warnings.warn(f"round_to auto: {err}; trying widths aligned to {narrower}", stacklevel=2)
    outcome.plan.notes["importance"] = importance
    return outcome


def auto_alignments() -> list[int]:
    """The alignments ``round_to="auto"`` tries for a latency target: the SIMD block, halved down to 4."""
    block = simd_block()
    return [block >> i for i in range(block.bit_length()) if block >> i >= 4]


def _prune_traced(pruned, graph, scores, plan_kwargs: dict, compensate: str, calibration,
                  groups: list | None = None) -> PruneOutcome:
    """Plan on a traced copy of the model and remove the channels from it, in place (``groups``: its
    channel groups, if already found)."""
    groups = groups or channel_groups(pruned, graph)
    return _prune_by(pruned, graph, groups, scores, make_plan(groups, scores, **plan_kwargs), compensate, calibration)


def _prune_by(pruned, graph, groups, scores, plan: ChannelPlan, compensate: str, calibration) -> PruneOutcome:
    """Remove the channels of ``plan`` from the traced model, in place."""
    zeroed = removed_bn_channels(pruned, graph, plan)
    apply_plan(pruned, plan, None if compensate == "none" else calibration, exact=compensate == "exact",
               graph=graph, zero_channels={g.root: zero_channels(g, scores) for g in groups})
    return PruneOutcome(pruned, plan, zeroed)


def save_pruned(path, model: nn.Module, plan: ChannelPlan) -> Path:
    """One file with the plan (plain types) and the pruned weights; :func:`load_pruned` rebuilds it."""
    from slimdeploy.train import save_atomic

    path = Path(path)
    save_atomic({"format": PRUNED_FORMAT, "plan": plan.to_dict(), "state_dict": model.state_dict()}, path)
    return path


def load_pruned(path, build=None) -> nn.Module:
    """The pruned model from :func:`save_pruned`'s file, or from a run directory (its
    ``pruned_plan.json`` and ``pruned.pt``), loaded with ``weights_only=True``.

    ``build`` overrides how the unpruned model is made: a callable returning it, or a factory's import
    path (called with the plan's ``model_kwargs``). Without it the plan's registry name, torchvision
    builder or ``nn.Module`` class is used; a plan naming any other factory needs ``build``.
    """
    from slimdeploy.train import load_checkpoint

    path = Path(path)
    if path.is_dir():
        plan = ChannelPlan.from_json(path / "pruned_plan.json")
        return rebuild_pruned(plan, load_checkpoint(path / "pruned.pt"), build)
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or saved.get("format") != PRUNED_FORMAT:
        raise InputError(f"{path}: not a file written by save_pruned (format {PRUNED_FORMAT})")
    try:
        plan = ChannelPlan.from_dict(saved["plan"])
    except (KeyError, TypeError) as err:
        raise InputError(f"{path}: the plan in it is not readable ({type(err).__name__}: {err})") from None
    return rebuild_pruned(plan, saved["state_dict"], build)


def export_onnx(model: nn.Module, path, example_inputs: torch.Tensor, verify: bool = True, *,
                opset: int = 17, tolerance: float = 1e-4) -> ExportCheck | None:
    """Export ``model`` to ONNX (dynamic batch) and, with ``verify``, check onnxruntime's output against
    PyTorch on ``example_inputs`` (raises ExportMismatchError beyond ``tolerance`` × max |logit|)."""
    _export(model, path, tuple(example_inputs.shape[1:]), opset=opset)
    return verify_onnx(model, path, example_inputs, tolerance=tolerance) if verify else None


def benchmark(paths, batch: int = 1, threads: int = 1, iters: int = 100, warmup: int = 10) -> list[dict]:
    """ONNX Runtime latency of each model, timed interleaved; one row per model with its speedup
    against the first."""
    config = ortbench.SessionConfig(threads=threads)
    stats = ortbench.time_sessions([str(p) for p in paths], batch=batch, config=config, warmup=warmup, iters=iters)
    return [{"model": str(p), **s.to_dict(), "speedup": stats[0].p50 / s.p50} for p, s in zip(paths, stats)]
