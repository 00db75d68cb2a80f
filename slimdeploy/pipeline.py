"""The stages glued: sparse training → plan → prune → fine-tune → export → benchmark → report.

Each stage is a function ``stage(ctx, ...)`` of a RunContext, created once per run, and returns one of
the report's types (slimdeploy.results). Every stage leaves its result in the run directory (RunDir
names the files; only rank 0 writes them). With ``resume`` the training stages continue from their
checkpoints (a finished one is not rerun); planning, pruning, export and benchmarks are deterministic
and redone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from slimdeploy import api, bench, distributed, export, imports, logs, ortbench, runtimes
from slimdeploy.accuracy import top1
from slimdeploy.data import Dataset, Normalize, first_images, labelled_batches, load_dataset
from slimdeploy.exports import EXPORTS
from slimdeploy.models import build_model
from slimdeploy.plan import ChannelPlan
from slimdeploy.prune import layer_widths, zero_bn_channels
from slimdeploy.recipe import Recipe
from slimdeploy.results import (
    ExportSummary, Int8LatencyRow, Int8Model, Int8Summary, LatencyRow, LayerWidth, ModelSummary, Percentiles,
    ProximalSummary, PruningSummary, RunReport, SparsitySummary, Speedup, StageHistory, ZeroedGammaCheck,
)
from slimdeploy.rundir import MODELS, RunDir
from slimdeploy.sparsity import Sparsifier, make_sparsifier
from slimdeploy.train import LoopSettings, TrainResult, evaluate, train, use_channels_last

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out_dir: Path
    report: dict  # report.json's content; empty on the ranks other than 0
    run_report: RunReport | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _threads(n: int) -> int:
    return n or os.cpu_count() or 1


def _recipe_fields(recipe: Recipe, *sections: str) -> dict:
    """The recipe without ``sections`` and without keys that change speed, not what training computes."""
    return recipe.model_dump(mode="json", exclude={**{s: True for s in sections}, "data": {"workers"}})


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train_stage(ctx: RunContext, model: nn.Module, sparsifier: Sparsifier, stage: str, fingerprint: str) -> TrainResult:
    """Train ``model`` by the recipe section of ``stage`` ("sparse": train, "finetune": finetune), resumable
    from the stage's checkpoint when ``fingerprint`` matches the one it was written with."""
    recipe, procs = ctx.recipe, ctx.procs
    cfg, checkpoint = ((recipe.train, ctx.run_dir.sparse_checkpoint) if stage == "sparse"
                       else (recipe.finetune, ctx.run_dir.finetune_checkpoint))
    loop = LoopSettings(batch_size=recipe.data.batch_size, eval_batch_size=recipe.data.eval_batch_size,
                        augment=recipe.data.augment, seed=recipe.seed, rank=procs.rank, world=procs.world,
                        fingerprint=fingerprint, device=ctx.device)
    return train(
        distributed.wrap(model, procs, ctx.device), ctx.data, cfg, loop, normalize=ctx.normalize,
        sparsifier=sparsifier, checkpoint=checkpoint, resume=ctx.resume, progress=ctx.progress, desc=stage,
    )


def _cpu_batch(normalize, split, n: int) -> torch.Tensor:
    """The first ``n`` images of ``split``, normalised, as a contiguous CPU batch."""
    return normalize(first_images(split, n)).cpu().contiguous()


@dataclass
class RunContext:
    """What every stage reads: the recipe, where its files go, the processes and the data."""

    recipe: Recipe
    run_dir: RunDir
    data: Dataset
    normalize: Normalize  # images to the model's device and memory format
    procs: distributed.Processes = field(default_factory=distributed.Processes)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume: bool = False  # continue the training stages from their checkpoints
    progress: bool = True  # progress bars
    logger: logging.Logger = log


class ModelPair(NamedTuple):
    """The dense and the pruned model, on the CPU in eval mode, for export and benchmarks."""

    dense: nn.Module
    pruned: nn.Module


def _load_data(recipe: Recipe, procs: distributed.Processes) -> Dataset:
    with distributed.main_first(procs):  # rank 0 fetches the data set, if it has to, before the others read it
        return load_dataset(recipe.data, recipe.seed)


def _normalizer(recipe: Recipe, data: Dataset, device: torch.device) -> Normalize:
    channels_last = use_channels_last(recipe.data.channels_last, device.type, recipe.train.precision)
    return Normalize(data.mean, data.std, device, channels_last)


def _build_model(ctx: RunContext) -> nn.Module:
    cfg = ctx.recipe.model
    model = build_model(cfg.name, ctx.data.num_classes, bn_init=cfg.bn_init, kwargs=cfg.kwargs, weights=cfg.weights)
    return model.to(ctx.device, memory_format=ctx.normalize.memory_format)


def plan_first_stage(ctx: RunContext, model: nn.Module) -> ChannelPlan:
    """prune.plan_first: the prune section's plan, made on the starting model (|γ| or the importance's
    scores) before sparse training, and written to first_plan.json. Rank 0 plans (a latency plan is timed)
    and the other ranks read its file; a resumed run reads the plan it trained toward."""
    path = ctx.run_dir.first_plan
    with distributed.main_first(ctx.procs):
        if path.is_file() and (ctx.resume or not ctx.run_dir.owner):
            return ChannelPlan.from_json(path)
        plan = _pruned(ctx, copy.deepcopy(model).cpu().eval(), None).plan
        ctx.run_dir.write_plan(plan, path)
    ctx.logger.info(f"planned first: {plan.channels_total - plan.channels_kept} of {plan.channels_total} channels "
                    f"to remove; the penalty acts on them alone")
    return plan


def sparse_train_stage(ctx: RunContext, model: nn.Module, sparsifier: Sparsifier,
                       first_plan: ChannelPlan | None = None) -> TrainResult:
    """Train ``model`` with the sparsity penalty (toward ``first_plan``, if made); its weights go to dense.pt."""
    recipe = ctx.recipe
    ctx.logger.info(f"sparse training: {recipe.model.name}, {recipe.sparsity.method}/{recipe.sparsity.penalty}, "
                    f"{recipe.train.epochs} epochs on {len(ctx.data.train)} {ctx.data.name} images")
    fingerprint = _fingerprint(_recipe_fields(recipe, "prune", "finetune", "export", "bench"),
                               *([asdict(first_plan)] if first_plan else []))
    trained = _train_stage(ctx, model, sparsifier, "sparse", fingerprint)
    ctx.run_dir.save_weights("dense", model)
    return trained


@dataclass
class PruneResult:
    model: nn.Module  # on the run's device
    plan: ChannelPlan
    summary: PruningSummary
    accuracy: float  # top-1 (%) before fine-tuning


def _prune_kwargs(recipe: Recipe) -> dict:
    kwargs = recipe.prune.prune_kwargs()
    if recipe.prune.how == "latency":  # the budget is met where the report's first latency is measured
        batch, threads = next(((s.batch, s.threads) for s in recipe.bench.settings), (1, 1))
        kwargs.update(latency_batch=batch, latency_threads=_threads(threads))
    return kwargs


def _pruned(ctx: RunContext, model: nn.Module, scores, plan: ChannelPlan | None = None) -> api.PruneOutcome:
    """A pruned copy of the CPU ``model`` as the recipe's prune section asks, or by ``plan`` as it is."""
    recipe = ctx.recipe
    taylor = recipe.prune.importance == "taylor" and plan is None
    return api.prune_with_record(
        model, _cpu_batch(ctx.normalize, ctx.data.train, recipe.prune.calibration_images), scores,
        **_prune_kwargs(recipe), model_name=recipe.model.name, model_kwargs=recipe.model.kwargs,
        taylor_batches=_taylor_batches(ctx) if taylor else None, plan=plan,
    )


def _taylor_batches(ctx: RunContext):
    """Labelled training batches for importance: taylor, on the CPU as the pruned copy is, not augmented;
    drawn one at a time (10,240 images at 224 px would take 6 GB at once)."""
    recipe = ctx.recipe
    batches = labelled_batches(ctx.data.train, recipe.data.batch_size, recipe.prune.taylor_images, recipe.seed,
                               ctx.normalize)
    return ((x.cpu(), y.cpu()) for x, y in batches)


def _zeroed_gamma_check(ctx: RunContext, dense: nn.Module, outcome: api.PruneOutcome) -> ZeroedGammaCheck:
    """The pruned model against ``dense`` with the removed BN channels zeroed, on test images."""
    x = _cpu_batch(ctx.normalize, ctx.data.test, 64)
    with torch.no_grad():
        ref = zero_bn_channels(copy.deepcopy(dense), outcome.zeroed_bn_channels)(x)
        return ZeroedGammaCheck(float((outcome.model(x) - ref).abs().max()), float(ref.abs().max()), len(x))


def _pruning_summary(ctx: RunContext, dense: nn.Module, outcome: api.PruneOutcome, seconds: float,
                     proximal: ProximalSummary | None) -> PruningSummary:
    plan = outcome.plan
    before, after = layer_widths(dense), layer_widths(outcome.model)
    return PruningSummary(
        how=plan.how, channels_total=plan.channels_total, channels_kept=plan.channels_kept, groups=len(plan.groups),
        score_cut=plan.score_cut, round_to=plan.round_to, seconds=seconds, compensated=ctx.recipe.prune.compensate,
        error_vs_zeroed_gamma=_zeroed_gamma_check(ctx, dense, outcome),
        layers=[LayerWidth(name, before[name], after[name]) for name in before], proximal=proximal,
        bn_recalibration_images=min(ctx.recipe.prune.bn_recalibration_images, len(ctx.data.train)),
    )


def _recalibrate_bn(ctx: RunContext, model: nn.Module, images: int) -> None:
    """Re-estimate the BN statistics of ``model`` on the first training images, as evaluation sees them;
    weights untouched (torch's update_bn: a cumulative average over the batches)."""
    x = first_images(ctx.data.train, images)
    torch.optim.swa_utils.update_bn((ctx.normalize(chunk) for chunk in x.split(ctx.recipe.data.eval_batch_size)),
                                    model)


def prune_stage(ctx: RunContext, dense: nn.Module, sparsifier: Sparsifier,
                first_plan: ChannelPlan | None = None) -> PruneResult:
    """Plan from the sparsifier's BN scores (or take ``first_plan``) and remove the channels from a copy of
    ``dense`` (a CPU model); the plan and the score and width plots go to the run directory. Under torchrun
    rank 0 plans and the other ranks apply its plan: a latency plan is timed, and timings differ per process."""
    recipe, scores = ctx.recipe, sparsifier.scores()
    tic = time.perf_counter()
    with distributed.main_first(ctx.procs):
        plan = first_plan or (None if ctx.run_dir.owner else ChannelPlan.from_json(ctx.run_dir.plan))
        outcome = _pruned(ctx, dense, scores, plan)
        ctx.run_dir.write_plan(outcome.plan)
    seconds = time.perf_counter() - tic
    proximal = sparsifier.summary()
    summary = _pruning_summary(ctx, dense, outcome, seconds, proximal)
    flat_scores = torch.cat([s.flatten().cpu() for s in scores.values()]).double().numpy()
    ctx.run_dir.write_pruning_plots(flat_scores, "|ξ|" if proximal else "|γ|", summary.layers)
    model = outcome.model.to(ctx.device, memory_format=ctx.normalize.memory_format)
    if summary.bn_recalibration_images:
        _recalibrate_bn(ctx, model, summary.bn_recalibration_images)
    accuracy = evaluate(model, ctx.data.test, ctx.normalize, recipe.data.eval_batch_size, ctx.progress)
    ctx.logger.info(f"pruned {summary.channels_total - summary.channels_kept} of {summary.channels_total} channels "
                    f"in {summary.seconds:.1f} s; accuracy {accuracy:.2f}% before fine-tuning")
    return PruneResult(model, outcome.plan, summary, accuracy)


def finetune_stage(ctx: RunContext, pruning: PruneResult) -> TrainResult | None:
    """Fine-tune the pruned model without penalty, if the recipe gives epochs; its weights go to pruned.pt."""
    recipe, model = ctx.recipe, pruning.model
    finetuned = None
    if recipe.finetune.epochs > 0:
        fingerprint = _fingerprint(_recipe_fields(recipe, "export", "bench"), asdict(pruning.plan))
        finetuned = _train_stage(ctx, model, Sparsifier(model), "finetune", fingerprint)
    ctx.run_dir.save_weights("pruned", model)
    return finetuned


def export_stage(ctx: RunContext, models: ModelPair) -> ExportSummary:
    """Both models to ONNX, each checked in onnxruntime against PyTorch (raises on a mismatch)."""
    cfg = ctx.recipe.export
    check = _cpu_batch(ctx.normalize, ctx.data.test, cfg.check_batch)
    results = []
    for model, path in zip(models, ctx.run_dir.onnx_files()):
        export.export_onnx(model, path, ctx.data.input_shape, opset=cfg.opset)
        results.append(export.verify_onnx(model, path, check, tolerance=cfg.tolerance))
    d, p = results
    ctx.logger.info(f"ONNX verified: max |ORT - PyTorch| {p.max_abs_diff:.3g} (max |logit| {p.max_abs_logit:.3g})")
    return ExportSummary(max_abs_diff=p.max_abs_diff, max_abs_logit=p.max_abs_logit, opset=p.opset,
                         tolerance=cfg.tolerance, dense_max_abs_diff=d.max_abs_diff,
                         dense_max_abs_logit=d.max_abs_logit, session=p.session)


def _accuracy_in(ctx: RunContext, runtime: str, path: Path) -> float:
    """Top-1 accuracy (%) of the file ``runtime`` loads over the whole test split."""
    loaded = runtimes.RUNTIMES.get(runtime).load(path, _threads(0))
    return top1(loaded.run, ctx.data.test, ctx.normalize, min(256, getattr(loaded, "max_batch", 256)))


def _int8_model(ctx: RunContext, fp32: Path, int8: Path, int8_files: dict[str, Path]) -> Int8Model:
    """onnxruntime, which quantized the file, gives the accuracy of record; every other runtime its own
    (of the QDQ file, or of its own INT8 program)."""
    return Int8Model(onnx=str(int8), onnx_bytes=bench.file_size(int8),
                     accuracy=_accuracy_in(ctx, "onnxruntime", int8),
                     fp32_accuracy=_accuracy_in(ctx, "onnxruntime", fp32),
                     accuracy_by_runtime={name: _accuracy_in(ctx, name, path)
                                          for name, path in int8_files.items() if name != "onnxruntime"})


def _int8_latency(ctx: RunContext, runtime: str, paths: list[Path], setting) -> Int8LatencyRow:
    """``paths``: dense and pruned FP32, then dense and pruned INT8, all loaded in ``runtime``. FP32 is
    timed again beside INT8, interleaved, so the two compare fairly."""
    cfg, threads = ctx.recipe.bench, _threads(setting.threads)
    loaded = runtimes.load_interleaved(runtime, paths, threads)
    dense32, pruned32, dense8, pruned8 = runtimes.time_models(loaded, ctx.data.input_shape, setting.batch,
                                                              cfg.warmup, cfg.iters, threads)
    # the dense INT8 model's session; its quantized ops run in int8, the rest in the runtime's own precision
    described = loaded[2].describe()
    session = {**described, "precision": "int8", "float_precision": described.get("precision")}
    return Int8LatencyRow(backend=runtime, batch=setting.batch, threads=threads, session=session,
                          dense_fp32=dense32, pruned_fp32=pruned32, dense=dense8, pruned=pruned8,
                          speedup_vs_fp32=Speedup(dense32.p50 / dense8.p50, pruned32.p50 / pruned8.p50))


def int8_stage(ctx: RunContext, models: ModelPair, files: dict[str, list[Path]]) -> Int8Summary:
    """Both ONNX models quantized for the recipe's INT8 target; accuracy and latency beside FP32 in every
    bench runtime (``files``: each runtime's FP32 files, dense and pruned)."""
    cfg = ctx.recipe.export
    target = export.resolve_int8_target(cfg.int8_target)
    types = export.int8_types(target)
    calib = _cpu_batch(ctx.normalize, ctx.data.train, cfg.int8_calibration_images)
    fp32 = ctx.run_dir.onnx_files()
    int8 = [export.quantize_int8(path, ctx.run_dir.int8_onnx(name), calib.numpy(), method=cfg.int8_calibration,
                                 **types) for name, path in zip(MODELS, fp32)]
    max_batch = max(s.batch for s in ctx.recipe.bench.settings)
    int8_files = {name: [runtimes.RUNTIMES.get(name).prepare_int8(model, path, ctx.data.input_shape, max_batch,
                                                                  calib) for model, path in zip(models, int8)]
                  for name in ctx.recipe.bench.runtimes}
    dense, pruned = [_int8_model(ctx, fp32[k], int8[k], {name: paths[k] for name, paths in int8_files.items()})
                     for k in range(len(MODELS))]
    fp32_files = {"onnxruntime": fp32, **files}
    return Int8Summary(
        target=target, **types, format="QDQ, per-channel weights", calibration=cfg.int8_calibration,
        calibration_images=len(calib),
        latency=[_int8_latency(ctx, runtime, fp32_files[runtime] + int8_files[runtime], setting)
                 for setting in ctx.recipe.bench.settings for runtime in ctx.recipe.bench.runtimes],
        dense=dense, pruned=pruned,
    )


def export_format_stage(ctx: RunContext, export_format: str | None, models: ModelPair,
                        files: dict[str, list[Path]]) -> Int8Summary | None:
    """The --export format's own stage, which slimdeploy.exports names; None for a format without one."""
    stage = EXPORTS.get(export_format) if export_format else None
    return imports.resolve(stage, f"--export {export_format}")(ctx, models, files) if stage else None


def _model_summary(model: nn.Module, shape, accuracy: float | None, onnx_path: Path | None,
                   latency_ms: Percentiles | None) -> ModelSummary:
    macs = bench.count_macs(model, shape)
    return ModelSummary(
        params=bench.count_params(model), macs=macs, flops=2 * macs,
        macs_flop_counter=bench.count_flop_counter_macs(model, shape), accuracy=accuracy,
        onnx=str(onnx_path) if onnx_path else None, latency_ms=latency_ms,
        onnx_bytes=bench.file_size(onnx_path) if onnx_path else None,
        peak_rss_mb=bench.peak_rss_mb(onnx_path) if onnx_path else None,
    )


def _model_summaries(ctx: RunContext, models: ModelPair, accuracies: tuple[float | None, float | None],
                     onnx_paths: list[Path], latency: list[LatencyRow]) -> list[ModelSummary]:
    """Dense and pruned: size, MACs and accuracy; with an export, the ONNX file and its first ORT latency."""
    first_ort = next((row for row in latency if row.backend == "onnxruntime"), None)
    latencies = [Percentiles.of(first_ort.dense), Percentiles.of(first_ort.pruned)] if first_ort else [None, None]
    return [_model_summary(model, ctx.data.input_shape, accuracy, path, ms)
            for model, accuracy, path, ms in zip(models, accuracies, onnx_paths or [None, None], latencies)]


def _runtime_files(ctx: RunContext, models: ModelPair, onnx_paths: list[Path]) -> dict[str, list[Path]]:
    """What each runtime but onnxruntime loads, dense and pruned: the ONNX files, or for ExecuTorch
    programs exported beside them (once, for every batch size the run checks or times)."""
    if not onnx_paths:
        return {}
    max_batch = max(ctx.recipe.export.check_batch, *(s.batch for s in ctx.recipe.bench.settings))
    return {name: [runtimes.prepare(name, model, path, ctx.data.input_shape, max_batch)
                   for model, path in zip(models, onnx_paths)]
            for name in ctx.recipe.bench.runtimes if name != "onnxruntime"}


def _verify_runtimes(ctx: RunContext, models: ModelPair, files: dict[str, list[Path]]) -> dict[str, dict]:
    """Each runtime but onnxruntime (checked at export) against PyTorch on the export check batch; raises
    ExportMismatchError beyond the tolerance for the precision the runtime chose."""
    if not files:
        return {}
    cfg = ctx.recipe.export
    check = _cpu_batch(ctx.normalize, ctx.data.test, cfg.check_batch)
    checks = {}
    for name, paths in files.items():
        d, p = [runtimes.verify(runtimes.RUNTIMES.get(name).load(path, _threads(0)), model, check, cfg.tolerance)
                for model, path in zip(models, paths)]
        checks[name] = {**p, "dense_max_abs_diff": d["max_abs_diff"], "dense_max_abs_logit": d["max_abs_logit"]}
    return checks


def _bench_setting(ctx: RunContext, models: ModelPair, onnx_paths: list[Path], files: dict[str, list[Path]],
                   setting) -> list[LatencyRow]:
    """One batch size and thread count: dense and pruned timed interleaved in each backend."""
    cfg, shape, threads = ctx.recipe.bench, ctx.data.input_shape, _threads(setting.threads)
    timing = dict(warmup=cfg.warmup, iters=cfg.iters)
    rows = []
    if onnx_paths and "onnxruntime" in cfg.runtimes:
        config = ortbench.SessionConfig(threads=threads)
        dense, pruned = ortbench.time_sessions(onnx_paths, batch=setting.batch, config=config,
                                               progress=ctx.progress, **timing)
        session = config.for_timing(len(onnx_paths)).describe()
        rows.append(LatencyRow(backend="onnxruntime", batch=setting.batch, threads=threads, session=session,
                               dense=dense, pruned=pruned))
    for name, paths in files.items():  # each runtime's dense and pruned models timed interleaved
        loaded = [runtimes.RUNTIMES.get(name).load(path, threads) for path in paths]
        dense, pruned = runtimes.time_models(loaded, shape, setting.batch, cfg.warmup, cfg.iters, threads)
        rows.append(LatencyRow(backend=name, batch=setting.batch, threads=threads, session=loaded[0].describe(),
                               dense=dense, pruned=pruned))
    if cfg.torch:
        dense, pruned = bench.torch_latency(list(models), shape, batch=setting.batch, threads=threads, **timing)
        rows.append(LatencyRow(backend="pytorch", batch=setting.batch, threads=threads, dense=dense, pruned=pruned))
    return rows


def benchmark_stage(ctx: RunContext, models: ModelPair, onnx_paths: list[Path],
                    files: dict[str, list[Path]]) -> list[LatencyRow]:
    """Dense vs pruned latency at every bench setting, in PyTorch and, with an export, each runtime;
    latency.png shows it."""
    rows = [row for setting in ctx.recipe.bench.settings
            for row in _bench_setting(ctx, models, onnx_paths, files, setting)]
    ctx.run_dir.write_latency_plot(rows)
    return rows


def report_stage(ctx: RunContext, report: RunReport) -> RunReport:
    """report.json and report.md in the run directory."""
    ctx.run_dir.write_report(report)
    ctx.logger.info(f"report: {ctx.run_dir.report_md}")
    return report


def _history(result: TrainResult | None, epochs: int) -> StageHistory:
    """A training stage's record; a stage that did not run took no time."""
    if result is None:
        return StageHistory(epochs, 0.0, [])
    return StageHistory(result.epochs, result.seconds, result.history)


def run(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    recipe_name: str = "recipe",
    export_format: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run every stage of a recipe and write the run directory; returns the report.

    Under torchrun every process trains its shard and prunes alike; only rank 0 writes files, exports,
    benchmarks and reports (the other ranks return an empty report).
    """
    if export_format is not None:
        EXPORTS.get(export_format)  # ValueError naming the allowed formats
    procs, device = distributed.setup(recipe.device)
    try:
        run_dir = RunDir(Path(out_dir), procs)
        run_dir.write_recipe(recipe)
        seed_everything(recipe.seed)
        data = _load_data(recipe, procs)
        ctx = RunContext(recipe, run_dir, data, _normalizer(recipe, data, device), procs, device, resume=resume,
                         progress=logs.progress_bars(progress))
        return _run(ctx, recipe_name, export_format)
    finally:
        distributed.teardown()


def _run(ctx: RunContext, recipe_name: str, export_format: str | None) -> RunResult:
    model = _build_model(ctx)
    first_plan = plan_first_stage(ctx, model) if ctx.recipe.prune.plan_first else None
    channels = api.plan_bn_channels(model, first_plan) if first_plan else None
    sparsifier = make_sparsifier(model, **ctx.recipe.sparsity.model_dump(), channels=channels)
    sparse = sparse_train_stage(ctx, model, sparsifier, first_plan)
    dense = copy.deepcopy(model).cpu().eval()  # planning, surgery, export and benchmarks run on the CPU
    pruning = prune_stage(ctx, dense, sparsifier, first_plan)
    finetuned = finetune_stage(ctx, pruning)
    if not ctx.run_dir.owner:  # the other ranks train alike; rank 0 alone exports, benchmarks and reports
        return RunResult(ctx.run_dir.root, {})

    models = ModelPair(dense, pruning.model.cpu().eval())
    onnx_paths = ctx.run_dir.onnx_files() if export_format else []
    exported = export_stage(ctx, models) if export_format else None
    files = _runtime_files(ctx, models, onnx_paths)
    runtime_checks = _verify_runtimes(ctx, models, files)
    latency = benchmark_stage(ctx, models, onnx_paths, files)
    int8 = export_format_stage(ctx, export_format, models, files)

    accuracies = (sparse.accuracy, finetuned.accuracy if finetuned else pruning.accuracy)
    dense_summary, pruned_summary = _model_summaries(ctx, models, accuracies, onnx_paths, latency)
    report = report_stage(ctx, RunReport(
        recipe=recipe_name, model=ctx.recipe.model.name, dataset=ctx.data.name, device=str(ctx.device),
        dense=dense_summary, pruned=pruned_summary, pruned_no_finetune_accuracy=pruning.accuracy,
        pruning=pruning.summary, sparsity=SparsitySummary.from_dict(ctx.recipe.sparsity.model_dump(mode="json")),
        export=exported, int8=int8, runtimes=runtime_checks, latency=latency,
        train=_history(sparse, ctx.recipe.train.epochs), finetune=_history(finetuned, ctx.recipe.finetune.epochs),
    ))
    return RunResult(ctx.run_dir.root, report.to_json(), report)


def load_pruned(run_dir: str | Path, build=None) -> torch.nn.Module:
    """The pruned model of a run directory, rebuilt from pruned_plan.json and pruned.pt."""
    return api.load_pruned(Path(run_dir), build)
