#!/usr/bin/env python
"""Latency of one dense model in onnxruntime against OpenVINO, the same ONNX file in both.

Exports the model (ResNet-20 by default; random weights, so latency only), checks each runtime's output
against PyTorch, and times the two interleaved with `slimdeploy.runtimes.time_models` at batch 1 / 1 thread
and batch 64 / 2 threads. Prints each runtime's p50 and its ratio to onnxruntime's measured in the same run
(above 1: faster than onnxruntime).

    tools/venv python benchmarks/runtimes.py [--model resnet20] [--iters 300]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from slimdeploy import ortbench, runtimes
from slimdeploy.export import export_onnx
from slimdeploy.models import build_model

SHAPE = (3, 32, 32)
SETTINGS = ((1, 1), (64, 2))  # (batch, threads)
NAMES = ("onnxruntime", "openvino")


def load_both(path: Path, threads: int) -> list:
    """Both runtimes on one file; onnxruntime without spin-waiting, as for any interleaved timing."""
    return [runtimes.OnnxRuntime.load(path, threads, spinning=ortbench.spinning_for(len(NAMES))),
            runtimes.OpenVino.load(path, threads)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model, 10).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / f"{args.model}.onnx", SHAPE)
        for loaded in load_both(path, threads=1):
            check = runtimes.verify(loaded, model, torch.randn(16, *SHAPE), tolerance=1e-4)
            print(f"{loaded.name}: {check.get('version', check.get('onnxruntime'))}, precision {check['precision']}, "
                  f"max |diff| {check['max_abs_diff']:.2e} (max |logit| {check['max_abs_logit']:.2f})")
        print(f"\n{args.model}, dense, random weights; {args.iters} interleaved iterations per setting")
        print(f"{'batch':>5} {'threads':>7} {'runtime':<12} {'p50 ms':>9} {'p90 ms':>9} {'vs ORT':>7}")
        for batch, threads in SETTINGS:
            stats = runtimes.time_models(load_both(path, threads), SHAPE, batch, args.warmup, args.iters, threads)
            for name, s in zip(NAMES, stats):
                print(f"{batch:>5} {threads:>7} {name:<12} {s.p50:>9.3f} {s.p90:>9.3f} {stats[0].p50 / s.p50:>6.2f}x")


if __name__ == "__main__":
    main()
