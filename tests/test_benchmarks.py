"""Smoke runs of the scripts in benchmarks/: they run to the end and print their rows (timings unjudged)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prune_latency_benchmark_runs():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prune_latency.py"), "--model", "resnet20",
                          "--iters", "2", "--warmup", "0", "--profile"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("batch ")]
    assert len(rows) == 4 and all(line.split()[-2].endswith("×") for line in rows)  # 2 settings × 2 variants
    assert "kernel time" in res.stdout and "resnet164: dependency graph" in res.stdout
