"""torchrun with 2 CPU processes (gloo): ranks end bit-identical, the loss falls, only rank 0 writes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["data.train_size=512", "data.test_size=64", "data.image_size=16", "data.batch_size=32",
            "train.epochs=3", "finetune.epochs=1", "bench.torch=false", "sparsity.method=proximal",
            "sparsity.lam=0.05", "sparsity.beta=10"]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    spy_dir, out = tmp_path / "spy", tmp_path / "run"
    spy_dir.mkdir()
    # Runs the CLI, and also saves every rank's weights after each training stage (outside the run dir: only
    # rank 0 writes there), through the stage runner every training stage goes through.
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f"""
        import runpy, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from slimdeploy import pipeline
        real = pipeline._train_stage
        def spy(ctx, model, sparsifier, stage, fingerprint):
            result = real(ctx, model, sparsifier, stage, fingerprint)
            torch.save(model.state_dict(), f"{spy_dir}/{{stage}}_rank{{ctx.procs.rank}}.pt")
            return result
        pipeline._train_stage = spy
        sys.argv = ["compress.py"] + sys.argv[1:]
        runpy.run_path({str(ROOT / "tools" / "compress.py")!r}, run_name="__main__")
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out), "--quiet", "--export", "onnx"]
    for s in SETTINGS:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    for stage in ("sparse", "finetune"):
        a = torch.load(spy_dir / f"{stage}_rank0.pt", weights_only=True)
        b = torch.load(spy_dir / f"{stage}_rank1.pt", weights_only=True)
        for k in a:
            assert torch.equal(a[k], b[k]), (stage, k)
    report = json.loads((out / "report.json").read_text())
    losses = [h["train_loss"] for h in report["train"]["history"]]

    # the same global batch (2 × 32) in one process: the loss falls alike
    single = tmp_path / "single"
    cmd = [sys.executable, str(ROOT / "tools" / "compress.py"), str(ROOT / "recipes" / "quickstart.yaml"),
           "--out", str(single), "--quiet"]
    for s in SETTINGS + ["data.batch_size=64", "finetune.epochs=0"]:
        cmd += ["--set", s]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    single_losses = [h["train_loss"] for h in json.loads((single / "report.json").read_text())["train"]["history"]]
    assert losses[-1] < losses[0] and single_losses[-1] < single_losses[0]
    assert abs(losses[-1] - single_losses[-1]) <= 0.1 * single_losses[-1], (losses, single_losses)
    assert report["export"]["max_abs_diff"] <= 1e-4 * report["export"]["max_abs_logit"]
    # one set of files, written by rank 0: nothing stray beside the contract's files
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["recipe.yaml", "checkpoints", "dense.pt", "pruned.pt", "pruned_plan.json",
                            "dense.onnx", "pruned.onnx", "report.json", "report.md", "scores.png", "widths.png",
                            "latency.png"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["finetune_last.pt", "last.pt"]
