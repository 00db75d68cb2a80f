"""A run killed with SIGKILL mid-training and resumed ends with weights bit-identical to an
uninterrupted run."""

import os
import signal
import subprocess
import time

import pytest
import torch

from slimdeploy.train import load_checkpoint

from helpers import FAST, QUICKSTART, cli_command

# Three epochs of 16 steps, checkpointed every 4: time to kill the run mid-training.
SETTINGS = [*FAST, "data.train_size=512", "data.test_size=64", "train.epochs=3", "train.checkpoint_steps=4",
            "finetune.epochs=0", "bench.torch=false", "sparsity.method=proximal", "sparsity.lam=0.05",
            "sparsity.beta=10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cmd(out, *extra):
    return cli_command(QUICKSTART, *SETTINGS, out=out, args=extra)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cmd(whole), env=ENV, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_checkpoint(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(ckpt)
    assert state["epoch"] < 3 and not (killed / "dense.pt").exists()

    subprocess.run(_cmd(killed, "--resume"), env=ENV, check=True, capture_output=True, timeout=600)
    a = torch.load(whole / "dense.pt", weights_only=True)
    b = torch.load(killed / "dense.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    xi_a = load_checkpoint(whole / "checkpoints" / "last.pt")["sparsifier"]["xi"]
    xi_b = load_checkpoint(ckpt)["sparsifier"]["xi"]
    assert all(torch.equal(xi_a[k], xi_b[k]) for k in xi_a)
