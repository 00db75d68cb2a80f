"""One end-to-end run of the CLI on synthetic data: the run directory and report.json contracts."""

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch

from slimdeploy import logs, pipeline
from slimdeploy.data import Normalize, first_images, make_synthetic
from slimdeploy.distributed import Processes
from slimdeploy.pipeline import _recalibrate_bn, load_pruned
from slimdeploy.recipe import build_recipe
from slimdeploy.results import RunReport
from slimdeploy.sparsity import make_sparsifier
from slimdeploy.train import load_checkpoint

from helpers import tiny_recipe, trained_like

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "data.train_size=256", "data.test_size=128", "data.image_size=16", "data.batch_size=32",
    "train.epochs=2", "finetune.epochs=1", "bench.iters=3", "bench.warmup=1",
    "bench.settings=[{batch: 1, threads: 1}, {batch: 4, threads: 0}]",
]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "tools" / "compress.py"), str(ROOT / "recipes" / "quickstart.yaml"),
            "--export", "onnx", "--out", str(out), "--quiet"]
    for s in FAST:
        args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    for name in ["recipe.yaml", "checkpoints/last.pt", "dense.pt", "pruned.pt", "pruned_plan.json",
                 "dense.onnx", "pruned.onnx", "report.json", "report.md", "scores.png", "widths.png", "latency.png"]:
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for key in ["recipe", "model", "dataset", "dense", "pruned", "pruning", "export", "train"]:
        assert key in report
    d, p = report["dense"], report["pruned"]
    for side in (d, p):
        assert {"params", "macs", "accuracy", "onnx", "latency_ms"} <= set(side)
        assert set(side["latency_ms"]) == {"p50", "p90", "p99"}
    ort_rows = [row for row in report["latency"] if row["backend"] == "onnxruntime"]
    assert ort_rows and all(row["session"]["intra_op_spinning"] is False for row in ort_rows)  # timed interleaved
    assert p["macs"] < d["macs"] and p["params"] < d["params"]
    e = report["export"]
    assert e["opset"] >= 17 and e["max_abs_diff"] <= 1e-4 * e["max_abs_logit"]
    pr = report["pruning"]
    assert 0 < pr["channels_kept"] < pr["channels_total"]
    assert pr["proximal"] is None  # subgradient training keeps no ξ
    assert all(l["after"] >= 1 for l in pr["layers"]) and any(l["after"] < l["before"] for l in pr["layers"])
    assert report["train"]["epochs"] == 2 and report["train"]["seconds"] > 0
    onnx.checker.check_model(str(out / "pruned.onnx"))
    # one latency row shape for every backend, and the file reads back as the typed report
    assert report["schema_version"] == 1
    assert {row["backend"] for row in report["latency"]} == {"onnxruntime", "pytorch"}
    assert all(set(row) == {"backend", "batch", "threads", "session", "dense", "pruned"} for row in report["latency"])
    assert RunReport.from_json(out / "report.json").to_json() == report

    # every artefact reloads without pickled classes
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["epoch"] == 2 and {"model", "optimizer", "scheduler", "sparsifier", "rng"} <= set(ck)
    torch.load(out / "dense.pt", weights_only=True)
    model = load_pruned(out).eval()
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)
    assert "| params |" in (out / "report.md").read_text()

    # resume: all stages done, so training is skipped and the same numbers come back
    res2 = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=900)
    assert res2.returncode == 0, res2.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert again["dense"]["accuracy"] == d["accuracy"] and again["pruned"]["params"] == p["params"]

    # several runs in one table and plot
    cmp = subprocess.run([sys.executable, str(ROOT / "tools" / "compare.py"), str(out), str(out),
                          "--out", str(tmp_path / "cmp"), "--md", str(tmp_path / "cmp" / "t.md")],
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    assert (tmp_path / "cmp" / "accuracy_vs_macs.png").is_file()
    assert len((tmp_path / "cmp" / "t.md").read_text().splitlines()) == 4  # header, rule, two runs

    # a document's marked block is regenerated from report .json files; the prose around it stays
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- compare:begin -->\nstale\n<!-- compare:end -->\noutro\n")
    cmp = subprocess.run([sys.executable, str(ROOT / "tools" / "compare.py"), str(out / "report.json"),
                          "--out", str(tmp_path / "cmp"), "--md", str(doc)], capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    lines = doc.read_text().splitlines()
    assert lines[0] == "intro" and lines[-1] == "outro" and "stale" not in lines
    assert lines[4].startswith("| report | subgradient L1, λ=")


@pytest.mark.slow
def test_int8_export_reports_accuracy_and_latency(tmp_path):
    out = tmp_path / "run8"
    args = [sys.executable, str(ROOT / "tools" / "compress.py"), str(ROOT / "recipes" / "quickstart.yaml"),
            "--export", "onnx-int8", "--out", str(out), "--quiet",
            "--set", "train.epochs=1", "--set", "finetune.epochs=0", "--set", "bench.torch=false",
            "--set", "bench.settings=[{batch: 1, threads: 1}]"]
    for s in FAST:
        if not s.startswith(("train.epochs", "finetune.epochs", "bench.settings")):
            args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    q = json.loads((out / "report.json").read_text())["int8"]
    for side in ("dense", "pruned"):
        assert (out / f"{side}.int8.onnx").is_file()
        assert 0 <= q[side]["accuracy"] <= 100
        assert q[side]["onnx_bytes"] < (out / f"{side}.onnx").stat().st_size
    assert q["latency"][0]["pruned"]["p50"] > 0
    assert q["activation"] == ("uint8" if q["target"] == "x86" else "int8") and q["weights"] == "int8"
    md = (out / "report.md").read_text()
    assert f"{q['activation']} activations" in md and "INT8 / FP32" in md


@pytest.fixture
def package_logger():
    logger = logging.getLogger(logs.PACKAGE)
    saved = logger.handlers[:], logger.level
    yield logging.getLogger("slimdeploy.pipeline")
    logger.handlers[:], logger.level = saved


def test_log_lines_come_from_rank_0_through_one_handler(package_logger, monkeypatch, capsys):
    logs.setup_logging(quiet=False)
    logs.setup_logging(quiet=False)  # the CLI may run twice in one process: still one handler
    assert sum(isinstance(h, logs.TqdmHandler) for h in logging.getLogger(logs.PACKAGE).handlers) == 1
    package_logger.info("rank 0 line")
    monkeypatch.setenv("RANK", "1")
    package_logger.warning("rank 1 line")
    assert not logs.progress_bars(True)
    monkeypatch.setenv("RANK", "0")
    assert logs.progress_bars(True) and not logs.progress_bars(False)
    out = capsys.readouterr().out
    assert out == "rank 0 line\n"


def test_quiet_keeps_warnings_only(package_logger, capsys):
    logs.setup_logging(quiet=True)
    package_logger.info("stage done")
    package_logger.warning("careful")
    assert capsys.readouterr().out == "careful\n"


def test_bn_recalibration_sets_the_statistics_of_the_first_training_images():
    """After ``_recalibrate_bn`` on one batch, eval mode (running statistics) computes what train mode
    (that batch's statistics) computes: the statistics are those images', whatever they were before."""
    data = make_synthetic(image_size=16, train_size=32, test_size=8)
    ctx = SimpleNamespace(data=data, normalize=Normalize(data.mean, data.std, "cpu"),
                          recipe=SimpleNamespace(data=SimpleNamespace(eval_batch_size=16)))
    model = trained_like("resnet20")  # running statistics unrelated to these images
    x = ctx.normalize(first_images(data.train, 16))
    with torch.no_grad():
        before = model.eval()(x)
        _recalibrate_bn(ctx, model, 16)
        assert not model.training
        batch_stats = copy.deepcopy(model).train()(x)
        # running_var is the unbiased variance, train mode normalises by the biased one: close, not equal
        error = (model(x) - batch_stats).abs().max()
        assert error <= 1e-2 * batch_stats.abs().max()
        assert (before - batch_stats).abs().max() > 10 * error


def test_pipeline_reports_bn_recalibration(tmp_path):
    recipe = build_recipe(tiny_recipe(prune={"bn_recalibration_images": 8}))
    report = pipeline.run(recipe, tmp_path, progress=False).report
    assert report["pruning"]["bn_recalibration_images"] == 8
    assert "accuracy right after pruning, BN statistics re-estimated on 8 training images (%)" in \
        (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("importance", ["group_norm", "taylor"])
def test_pipeline_ranks_by_the_recipes_importance(tmp_path, importance):
    recipe = build_recipe(tiny_recipe(prune={"importance": importance, "taylor_images": 16}))
    report = pipeline.run(recipe, tmp_path, progress=False).report
    assert json.loads((tmp_path / "pruned_plan.json").read_text())["notes"]["importance"] == importance
    assert 0 < report["pruning"]["channels_kept"] < report["pruning"]["channels_total"]


def test_plan_first_trains_toward_the_plan_and_pruning_by_it_loses_nothing(tmp_path):
    """prune.plan_first: the plan is made on the starting model, proximal NS drives its channels (and no
    others) to 0, and the pruned model, before any fine-tuning, is as accurate as the sparse-trained one."""
    recipe = build_recipe(tiny_recipe(sparsity={"method": "proximal", "penalty": "l1", "lam": 1e3},
                                      prune={"plan_first": True, "percent": 0.5, "round_to": 4,
                                             "importance": "taylor", "taylor_images": 16},
                                      train={"epochs": 2}))
    report = pipeline.run(recipe, tmp_path, progress=False).report
    first = json.loads((tmp_path / "first_plan.json").read_text())
    applied = json.loads((tmp_path / "pruned_plan.json").read_text())
    assert [g["remove"] for g in applied["groups"]] == [g["remove"] for g in first["groups"]]
    removed = report["pruning"]["channels_total"] - report["pruning"]["channels_kept"]
    assert removed > 0 and report["pruning"]["proximal"]["xi_zeros"] >= removed
    assert report["pruned_no_finetune_accuracy"] == report["dense"]["accuracy"]
    check = report["pruning"]["error_vs_zeroed_gamma"]
    assert check["max_abs_diff"] <= 1e-5 * check["max_abs_logit"]


def test_prune_stage_on_other_ranks_applies_the_plan_rank_0_wrote(tmp_path):
    """Under torchrun only rank 0 plans (a latency plan is timed, and timings differ per process): another
    rank applies the plan in the run directory, not one of its own."""
    recipe = build_recipe(tiny_recipe(prune={"percent": 0.5, "round_to": 4}))
    data = pipeline._load_data(recipe, Processes())
    normalize = pipeline._normalizer(recipe, data, torch.device("cpu"))
    owner = pipeline.RunContext(recipe, pipeline.RunDir(tmp_path), data, normalize, progress=False)
    model = pipeline._build_model(owner).eval()
    written = pipeline.prune_stage(owner, model, make_sparsifier(model, "subgradient", "l1", 1e-4)).plan

    recipe = build_recipe(tiny_recipe(prune={"percent": 0.2, "round_to": 4}))  # would plan fewer channels
    other = pipeline.RunContext(recipe, pipeline.RunDir(tmp_path, Processes(rank=1, world=2)), data, normalize,
                                progress=False)
    applied = pipeline.prune_stage(other, model, make_sparsifier(model, "subgradient", "l1", 1e-4)).plan
    assert [g.remove for g in applied.groups] == [g.remove for g in written.groups]
    assert applied.channels_kept == written.channels_kept
