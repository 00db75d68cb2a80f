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

from slimdeploy import bench, distributed, export, ortbench
from slimdeploy.data import Dataset, Normalize, load_dataset
from slimdeploy.graph import build_graph, channel_groups
from slimdeploy.models import build_model
from slimdeploy.plan import ChannelPlan, make_plan
from slimdeploy.prune import apply_plan, layer_widths, rebuild_pruned, zero_removed_gammas
from slimdeploy.recipe import Recipe
from slimdeploy.sparsity import ProximalSparsifier, Sparsifier, make_sparsifier
from slimdeploy.report import plot_latency, plot_scores, plot_widths, write_json, write_markdown
from slimdeploy.train import evaluate, load_checkpoint, save_atomic, train

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


def _cpu_batch(normalize, images) -> torch.Tensor:
    return normalize(images).cpu().contiguous()


@dataclass
class PruneResult:
    model: torch.nn.Module
    plan: ChannelPlan
    seconds: float
    error_vs_zeroed_gamma: dict


def prune_stage(dense, scores, recipe: Recipe, data: Dataset, normalize) -> PruneResult:
    """Plan from the BN scores and remove the channels from a copy of ``dense`` (a CPU model)."""
    tic = time.perf_counter()
    pruned = copy.deepcopy(dense)
    groups = channel_groups(pruned, build_graph(pruned, torch.randn(1, *data.input_shape)))
    plan = make_plan(groups, scores, recipe.prune, model_name=recipe.model.name,
                     num_classes=data.num_classes, input_shape=data.input_shape)
    compensate = recipe.prune.compensate
    calibration = _cpu_batch(normalize, data.train.images[: recipe.prune.calibration_images])
    apply_plan(pruned, plan, None if compensate == "none" else calibration, exact=compensate == "exact")
    seconds = time.perf_counter() - tic
    error = _compensation_error(dense, pruned, plan, _cpu_batch(normalize, data.test.images[:64]))
    return PruneResult(pruned, plan, seconds, error)


def export_stage(dense, pruned, paths, data: Dataset, normalize, cfg) -> dict:
    """Both models to ONNX, each checked in onnxruntime against PyTorch (raises on a mismatch)."""
    check = _cpu_batch(normalize, data.test.images[: cfg.check_batch])
    results = []
    for model, path in zip((dense, pruned), paths):
        export.export_onnx(model, path, data.input_shape, opset=cfg.opset)
        results.append(export.verify_onnx(model, path, check, tolerance=cfg.tolerance))
    d, p = results
    return {"max_abs_diff": p.max_abs_diff, "max_abs_logit": p.max_abs_logit, "opset": p.opset,
            "tolerance": cfg.tolerance, "dense_max_abs_diff": d.max_abs_diff, "dense_max_abs_logit": d.max_abs_logit}


def _ort_accuracy(path, data: Dataset, normalize, batch: int = 256) -> float:
    sess = ortbench.make_session(path, threads=_threads(0))
    name = sess.get_inputs()[0].name
    correct = 0
    for start in range(0, len(data.test), batch):
        x = _cpu_batch(normalize, data.test.images[start : start + batch]).numpy()
        logits = sess.run(None, {name: x})[0]
        correct += int((logits.argmax(1) == data.test.labels[start : start + batch].numpy()).sum())
    return 100.0 * correct / len(data.test)


def _int8_stage(out: Path, data, normalize, recipe, progress) -> dict:
    calib = _cpu_batch(normalize, data.train.images[:256]).numpy()
    result = {"calibration_images": len(calib), "format": "QDQ, per-channel weights", "latency": []}
    paths = {}
    for name in ("dense", "pruned"):
        paths[name] = export.quantize_int8(out / f"{name}.onnx", out / f"{name}.int8.onnx", calib)
        result[name] = {
            "onnx": str(paths[name]),
            "onnx_bytes": bench.file_size(paths[name]),
            "accuracy": _ort_accuracy(paths[name], data, normalize),
        }
    for s in recipe.bench.settings:
        # FP32 timed again beside INT8, interleaved in one session set, so the two compare fairly.
        fp32 = [out / "dense.onnx", out / "pruned.onnx"]
        stats = ortbench.time_sessions(
            fp32 + [paths["dense"], paths["pruned"]], batch=s.batch, threads=_threads(s.threads),
            warmup=recipe.bench.warmup, iters=recipe.bench.iters, progress=progress,
        )
        result["latency"].append({"batch": s.batch, "threads": _threads(s.threads),
                                  "dense_fp32": stats[0].to_dict(), "pruned_fp32": stats[1].to_dict(),
                                  "dense": stats[2].to_dict(), "pruned": stats[3].to_dict()})
    return result


@torch.no_grad()
def _compensation_error(dense, pruned, plan, x) -> dict:
    """How far the pruned model is from the trained one with the removed γ set to zero (β kept)."""
    ref = zero_removed_gammas(copy.deepcopy(dense), plan)(x)
    return {"max_abs_diff": float((pruned(x) - ref).abs().max()), "max_abs_logit": float(ref.abs().max()),
            "images": len(x)}


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


def _benchmark(dense, pruned, shape, onnx_paths, recipe, progress) -> list[dict]:
    rows = []
    for s in recipe.bench.settings:
        threads = _threads(s.threads)
        if onnx_paths:
            stats = ortbench.time_sessions(
                onnx_paths, batch=s.batch, threads=threads,
                warmup=recipe.bench.warmup, iters=recipe.bench.iters, progress=progress,
            )
            session = ortbench.session_options_dict(threads, spinning=ortbench.spinning_for(len(onnx_paths)))
            rows.append({"backend": "onnxruntime", "batch": s.batch, "threads": threads, "session": session,
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
    normalize = Normalize(data.mean, data.std, device, recipe.data.channels_last)
    shape = data.input_shape
    memory_format = torch.channels_last if recipe.data.channels_last else torch.contiguous_format
    model = build_model(recipe.model.name, data.num_classes, bn_init=recipe.model.bn_init)
    model = model.to(device, memory_format=memory_format)

    # 1. sparse training
    sparsifier = make_sparsifier(model, recipe.sparsity)
    log(f"sparse training: {recipe.model.name}, {recipe.sparsity.method}/{recipe.sparsity.penalty}, "
        f"{recipe.train.epochs} epochs on {len(data.train)} {data.name} images")
    trained = _train_stage(model, data, recipe.train, recipe, sparsifier, normalize,
                           out / "checkpoints" / "last.pt", resume, progress, "sparse", procs, device,
                           _fingerprint(recipe.model_dump(mode="json", exclude={"prune", "finetune", "export", "bench"})))
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
                                 _fingerprint(recipe.model_dump(mode="json", exclude={"export", "bench"}), asdict(plan)))
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


def load_pruned(run_dir: str | Path) -> torch.nn.Module:
    """The pruned model of a run directory, rebuilt from pruned_plan.json and pruned.pt."""
    run_dir = Path(run_dir)
    plan = ChannelPlan.from_json(run_dir / "pruned_plan.json")
    return rebuild_pruned(plan, load_checkpoint(run_dir / "pruned.pt"))
