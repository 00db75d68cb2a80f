"""The stages glued: sparse training → plan → prune → fine-tune → export → benchmark → report.

Every stage leaves its result in the run directory. With ``resume`` the training stages continue
from their checkpoints (a finished one is not rerun); planning, pruning, export and benchmarks are
deterministic and redone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slimdeploy import api, bench, distributed, export, ortbench, runtimes
from slimdeploy.data import Dataset, Normalize, eval_batches, first_images, load_dataset
from slimdeploy.models import build_model
from slimdeploy.plan import ChannelPlan
from slimdeploy.prune import layer_widths, zero_bn_channels
from slimdeploy.recipe import Recipe
from slimdeploy.sparsity import ProximalSparsifier, Sparsifier, make_sparsifier
from slimdeploy.report import plot_latency, plot_scores, plot_widths, write_json, write_markdown
from slimdeploy.train import evaluate, load_checkpoint, save_atomic, train, use_channels_last

EXPORTS = ("onnx", "onnx-int8")


@dataclass
class RunResult:
    out_dir: Path
    report: dict


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


def _train_stage(model, data, opt_cfg, recipe, sparsifier, normalize, ckpt, resume, progress, desc, procs, device,
                 fingerprint):
    return train(
        distributed.wrap(model, procs, device), data, opt_cfg,
        batch_size=recipe.data.batch_size, eval_batch_size=recipe.data.eval_batch_size,
        augment=recipe.data.augment, normalize=normalize, sparsifier=sparsifier,
        seed=recipe.seed, checkpoint=ckpt, resume=resume, progress=progress and procs.main, desc=desc,
        rank=procs.rank, world=procs.world, fingerprint=fingerprint,
    )


def _cpu_batch(normalize, split, n: int) -> torch.Tensor:
    """The first ``n`` images of ``split``, normalised, as a contiguous CPU batch."""
    return normalize(first_images(split, n)).cpu().contiguous()


@dataclass
class PruneResult:
    model: torch.nn.Module
    plan: ChannelPlan
    seconds: float
    error_vs_zeroed_gamma: dict


def prune_stage(dense, scores, recipe: Recipe, data: Dataset, normalize) -> PruneResult:
    """Plan from the BN scores and remove the channels from a copy of ``dense`` (a CPU model)."""
    tic = time.perf_counter()
    kwargs = recipe.prune.prune_kwargs()
    if recipe.prune.how == "latency":  # the budget is met where the report's first latency is measured
        batch, threads = next(((s.batch, s.threads) for s in recipe.bench.settings), (1, 1))
        kwargs.update(latency_batch=batch, latency_threads=_threads(threads))
    outcome = api.prune_with_record(
        dense, _cpu_batch(normalize, data.train, recipe.prune.calibration_images), scores,
        **kwargs, model_name=recipe.model.name, model_kwargs=recipe.model.kwargs,
    )
    seconds = time.perf_counter() - tic
    x = _cpu_batch(normalize, data.test, 64)
    with torch.no_grad():
        ref = zero_bn_channels(copy.deepcopy(dense), outcome.zeroed_bn_channels)(x)
        error = {"max_abs_diff": float((outcome.model(x) - ref).abs().max()),
                 "max_abs_logit": float(ref.abs().max()), "images": len(x)}
    return PruneResult(outcome.model, outcome.plan, seconds, error)


def export_stage(dense, pruned, paths, data: Dataset, normalize, cfg) -> dict:
    """Both models to ONNX, each checked in onnxruntime against PyTorch (raises on a mismatch)."""
    check = _cpu_batch(normalize, data.test, cfg.check_batch)
    results = []
    for model, path in zip((dense, pruned), paths):
        export.export_onnx(model, path, data.input_shape, opset=cfg.opset)
        results.append(export.verify_onnx(model, path, check, tolerance=cfg.tolerance))
    d, p = results
    return {"max_abs_diff": p.max_abs_diff, "max_abs_logit": p.max_abs_logit, "opset": p.opset,
            "tolerance": cfg.tolerance, "dense_max_abs_diff": d.max_abs_diff, "dense_max_abs_logit": d.max_abs_logit}


def _ort_accuracy(path, data: Dataset, normalize, batch: int = 256) -> float:
    """Top-1 accuracy (%) of an ONNX model in onnxruntime over the whole test split."""
    sess = ortbench.make_session(path, threads=_threads(0))
    name = sess.get_inputs()[0].name
    correct = seen = 0
    for images, labels in eval_batches(data.test, batch):
        logits = sess.run(None, {name: normalize(images).cpu().contiguous().numpy()})[0]
        correct += int((logits.argmax(1) == labels.numpy()).sum())
        seen += len(labels)
    return 100.0 * correct / seen


def _int8_stage(out: Path, data, normalize, recipe, progress) -> dict:
    """Both ONNX models quantized for the recipe's INT8 target; accuracy and latency beside FP32."""
    cfg = recipe.export
    target = export.resolve_int8_target(cfg.int8_target)
    types = export.int8_types(target)
    calib = _cpu_batch(normalize, data.train, cfg.int8_calibration_images).numpy()
    result = {"target": target, **types, "format": "QDQ, per-channel weights", "calibration": cfg.int8_calibration,
              "calibration_images": len(calib), "latency": []}
    fp32 = {name: out / f"{name}.onnx" for name in ("dense", "pruned")}
    int8 = {}
    for name, path in fp32.items():
        int8[name] = export.quantize_int8(path, out / f"{name}.int8.onnx", calib, method=cfg.int8_calibration,
                                          **types)
        result[name] = {
            "onnx": str(int8[name]),
            "onnx_bytes": bench.file_size(int8[name]),
            "accuracy": _ort_accuracy(int8[name], data, normalize),
            "fp32_accuracy": _ort_accuracy(path, data, normalize),
        }
    for s in recipe.bench.settings:
        # FP32 timed again beside INT8, interleaved in one session set, so the two compare fairly.
        stats = ortbench.time_sessions(
            [*fp32.values(), *int8.values()], batch=s.batch, threads=_threads(s.threads),
            warmup=recipe.bench.warmup, iters=recipe.bench.iters, progress=progress,
        )
        result["latency"].append({"batch": s.batch, "threads": _threads(s.threads),
                                  "dense_fp32": stats[0].to_dict(), "pruned_fp32": stats[1].to_dict(),
                                  "dense": stats[2].to_dict(), "pruned": stats[3].to_dict(),
                                  "speedup_vs_fp32": {"dense": stats[0].p50 / stats[2].p50,
                                                      "pruned": stats[1].p50 / stats[3].p50}})
    return result


def _model_summary(model, shape, accuracy, onnx_path) -> dict:
    macs = bench.count_macs(model, shape)
    summary = {
        "params": bench.count_params(model),
        "macs": macs,
        "flops": 2 * macs,
        "macs_flop_counter": bench.count_flop_counter_macs(model, shape),
        "accuracy": accuracy,
        "onnx": str(onnx_path) if onnx_path else None,
        "latency_ms": None,
    }
    if onnx_path:
        summary["onnx_bytes"] = bench.file_size(onnx_path)
        summary["peak_rss_mb"] = bench.peak_rss_mb(onnx_path)
    return summary


def _verify_runtimes(dense, pruned, onnx_paths, data: Dataset, normalize, recipe) -> dict:
    """Each runtime but onnxruntime (checked at export) against PyTorch on the export check batch; raises
    ExportMismatchError beyond the tolerance for the precision the runtime chose."""
    others = [name for name in recipe.bench.runtimes if name != "onnxruntime"]
    if not onnx_paths or not others:
        return {}
    check = _cpu_batch(normalize, data.test, recipe.export.check_batch)
    checks = {}
    for name in others:
        d, p = [runtimes.verify(runtimes.RUNTIMES[name].load(path, _threads(0)), model, check, recipe.export.tolerance)
                for model, path in zip((dense, pruned), onnx_paths)]
        checks[name] = {**p, "dense_max_abs_diff": d["max_abs_diff"], "dense_max_abs_logit": d["max_abs_logit"]}
    return checks


def _benchmark(dense, pruned, shape, onnx_paths, recipe, progress) -> list[dict]:
    rows = []
    others = [name for name in recipe.bench.runtimes if name != "onnxruntime"] if onnx_paths else []
    for s in recipe.bench.settings:
        threads = _threads(s.threads)
        if onnx_paths and "onnxruntime" in recipe.bench.runtimes:
            stats = ortbench.time_sessions(
                onnx_paths, batch=s.batch, threads=threads,
                warmup=recipe.bench.warmup, iters=recipe.bench.iters, progress=progress,
            )
            session = ortbench.session_options_dict(threads, spinning=ortbench.spinning_for(len(onnx_paths)))
            rows.append({"backend": "onnxruntime", "batch": s.batch, "threads": threads, "session": session,
                         "dense": stats[0].to_dict(), "pruned": stats[1].to_dict()})
        for name in others:  # each runtime's dense and pruned models timed interleaved
            loaded = [runtimes.RUNTIMES[name].load(path, threads) for path in onnx_paths]
            stats = runtimes.time_models(loaded, shape, s.batch, recipe.bench.warmup, recipe.bench.iters, threads)
            rows.append({"backend": name, "batch": s.batch, "threads": threads, "session": loaded[0].describe(),
                         "dense": stats[0].to_dict(), "pruned": stats[1].to_dict()})
        if recipe.bench.torch:
            stats = bench.torch_latency([dense, pruned], shape, batch=s.batch, threads=threads,
                                        warmup=recipe.bench.warmup, iters=recipe.bench.iters)
            rows.append({"backend": "pytorch", "batch": s.batch, "threads": threads,
                         "dense": stats[0].to_dict(), "pruned": stats[1].to_dict()})
    return rows


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
    if export_format not in (None, *EXPORTS):
        raise ValueError(f"export must be one of {', '.join(EXPORTS)}, got {export_format!r}")
    procs, device = distributed.setup(recipe.device)
    try:
        return _run(recipe, Path(out_dir), recipe_name, export_format, resume, progress, procs, device)
    finally:
        distributed.teardown()


def _run(recipe, out, recipe_name, export_format, resume, progress, procs, device) -> RunResult:
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
    seed_everything(recipe.seed)
    log = (lambda msg: tqdm.write(msg)) if progress and procs.main else (lambda msg: None)

    if not procs.main:  # rank 0 fetches the data set first, if it has to
        distributed.barrier()
    data = load_dataset(recipe.data, recipe.seed)
    if procs.main:
        distributed.barrier()
    channels_last = use_channels_last(recipe.data.channels_last, device.type, recipe.train.precision)
    normalize = Normalize(data.mean, data.std, device, channels_last)
    shape = data.input_shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(recipe.model.name, data.num_classes, bn_init=recipe.model.bn_init,
                        kwargs=recipe.model.kwargs, weights=recipe.model.weights)
    model = model.to(device, memory_format=memory_format)

    # 1. sparse training
    sparsifier = make_sparsifier(model, **recipe.sparsity.model_dump())
    log(f"sparse training: {recipe.model.name}, {recipe.sparsity.method}/{recipe.sparsity.penalty}, "
        f"{recipe.train.epochs} epochs on {len(data.train)} {data.name} images")
    trained = _train_stage(model, data, recipe.train, recipe, sparsifier, normalize,
                           out / "checkpoints" / "last.pt", resume, progress, "sparse", procs, device,
                           _fingerprint(_recipe_fields(recipe, "prune", "finetune", "export", "bench")))
    if procs.main:
        save_atomic(model.state_dict(), out / "dense.pt")
    scores = sparsifier.scores()

    # 2. plan and physical pruning, on a CPU copy (graph tracing and surgery are cheap there)
    dense_cpu = copy.deepcopy(model).cpu().eval()
    pruning = prune_stage(dense_cpu, scores, recipe, data, normalize)
    plan, prune_seconds = pruning.plan, pruning.seconds
    if isinstance(sparsifier, ProximalSparsifier):
        plan.notes["proximal"] = sparsifier.zero_summary()
    if procs.main:
        plan.to_json(out / "pruned_plan.json")
    pruned = pruning.model.to(device, memory_format=memory_format)
    no_ft_acc = evaluate(pruned, data.test, normalize, recipe.data.eval_batch_size, progress and procs.main)
    log(f"pruned {plan.channels_total - plan.channels_kept} of {plan.channels_total} channels "
        f"in {prune_seconds:.1f} s; accuracy {trained.accuracy:.2f}% → {no_ft_acc:.2f}% before fine-tuning")

    # 3. fine-tuning, without penalty
    finetuned = None
    if recipe.finetune.epochs > 0:
        finetuned = _train_stage(pruned, data, recipe.finetune, recipe, Sparsifier(pruned), normalize,
                                 out / "checkpoints" / "finetune_last.pt", resume, progress, "finetune",
                                 procs, device,
                                 _fingerprint(_recipe_fields(recipe, "export", "bench"), asdict(plan)))
    pruned_acc = finetuned.accuracy if finetuned else no_ft_acc
    if not procs.main:
        return RunResult(out, {})
    save_atomic(pruned.state_dict(), out / "pruned.pt")

    # 4. export, checked against PyTorch in onnxruntime
    pruned_cpu = pruned.cpu().eval()
    onnx_paths, export_info, int8 = [], None, None
    if export_format:
        onnx_paths = [out / "dense.onnx", out / "pruned.onnx"]
        export_info = export_stage(dense_cpu, pruned_cpu, onnx_paths, data, normalize, recipe.export)
        log(f"ONNX verified: max |ORT - PyTorch| {export_info['max_abs_diff']:.3g} "
            f"(max |logit| {export_info['max_abs_logit']:.3g})")

    # 5. benchmark and report
    dense_sum = _model_summary(dense_cpu, shape, trained.accuracy, onnx_paths[0] if onnx_paths else None)
    pruned_sum = _model_summary(pruned_cpu, shape, pruned_acc, onnx_paths[1] if onnx_paths else None)
    runtime_checks = _verify_runtimes(dense_cpu, pruned_cpu, onnx_paths, data, normalize, recipe)
    latency = _benchmark(dense_cpu, pruned_cpu, shape, onnx_paths, recipe, progress)
    first_ort = next((r for r in latency if r["backend"] == "onnxruntime"), None)
    if first_ort:
        for summary, key in ((dense_sum, "dense"), (pruned_sum, "pruned")):
            summary["latency_ms"] = {k: first_ort[key][k] for k in ("p50", "p90", "p99")}
    if export_format == "onnx-int8":
        int8 = _int8_stage(out, data, normalize, recipe, progress)

    before, after = layer_widths(dense_cpu), layer_widths(pruned_cpu)
    flat_scores = torch.cat([s.flatten().cpu() for s in scores.values()]).double().numpy()
    report = {
        "recipe": recipe_name,
        "model": recipe.model.name,
        "dataset": data.name,
        "device": str(device),
        "dense": dense_sum,
        "pruned": pruned_sum,
        "pruned_no_finetune_accuracy": no_ft_acc,
        "macs_counter": "thop",
        "pruning": {
            "how": plan.how,
            "channels_total": plan.channels_total,
            "channels_kept": plan.channels_kept,
            "groups": len(plan.groups),
            "score_cut": plan.score_cut,
            "round_to": plan.round_to,
            "seconds": prune_seconds,
            "compensated": recipe.prune.compensate,
            "error_vs_zeroed_gamma": pruning.error_vs_zeroed_gamma,
            "layers": [{"name": n, "before": before[n], "after": after[n]} for n in before],
            **({"proximal": plan.notes["proximal"]} if "proximal" in plan.notes else {}),
        },
        "sparsity": recipe.sparsity.model_dump(mode="json"),
        "export": export_info,
        "int8": int8,
        "runtimes": runtime_checks,
        "latency": latency,
        "train": {"epochs": trained.epochs, "seconds": trained.seconds, "history": trained.history},
        "finetune": {"epochs": recipe.finetune.epochs, "seconds": finetuned.seconds if finetuned else 0.0,
                     "history": finetuned.history if finetuned else []},
    }
    plot_scores(flat_scores, out / "scores.png", "|ξ|" if isinstance(sparsifier, ProximalSparsifier) else "|γ|")
    plot_widths(report["pruning"]["layers"], out / "widths.png")
    if latency:
        plot_latency(latency, out / "latency.png")
    write_json(report, out)
    write_markdown(report, out)
    log(f"report: {out / 'report.md'}")
    return RunResult(out, report)


def load_pruned(run_dir: str | Path, build=None) -> torch.nn.Module:
    """The pruned model of a run directory, rebuilt from pruned_plan.json and pruned.pt."""
    return api.load_pruned(Path(run_dir), build)
