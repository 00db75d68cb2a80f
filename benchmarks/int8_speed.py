#!/usr/bin/env python
"""ONNX Runtime latency of a dense model in FP32 against INT8 with x86 types (U8 activations, S8 weights)
and with arm types (S8S8).

Exports the model (ResNet-20 by default; random weights, so latency only), quantizes it both ways with
`slimdeploy.export.quantize_int8` (x86: reduce_range as this CPU needs it, see `int8_types`), and times
the three models interleaved with `slimdeploy.ortbench` at batch 1 / 1 thread and batch 64 / 2 threads.
Prints each model's p50 and its speedup over FP32 measured in the same run.

    tools/venv python benchmarks/int8_speed.py [--model resnet20] [--iters 300] [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from slimdeploy import ortbench
from slimdeploy.export import cpu_has_vnni, export_onnx, int8_types, quantize_int8
from slimdeploy.models import build_model

SHAPE = (3, 32, 32)
SETTINGS = ((1, 1), (64, 2))  # (batch, threads)


def export_variants(model_name: str, out: Path, calibration_images: int) -> dict[str, Path]:
    """FP32, INT8 x86 and INT8 arm ONNX files of one randomly initialised model."""
    torch.manual_seed(0)
    fp32 = export_onnx(build_model(model_name, 10), out / f"{model_name}.onnx", SHAPE)
    calib = np.random.default_rng(0).standard_normal((calibration_images, *SHAPE), dtype=np.float32)
    paths = {"fp32": fp32}
    for target in ("x86", "arm"):
        types = int8_types(target)
        paths[f"int8 {target} ({_short(types)})"] = quantize_int8(
            fp32, out / f"{model_name}.int8.{target}.onnx", calib, **types)
    return paths


def _short(types: dict) -> str:
    short = "".join("U8" if types[k] == "uint8" else "S8" for k in ("activation", "weights"))
    return short + (", 7-bit weights" if types["reduce_range"] else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--out", help="keep the ONNX files here (default: a temporary folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        paths = export_variants(args.model, out, args.calibration_images)
        print(f"{args.model}, onnxruntime {ortbench.ort.__version__}, VNNI: {cpu_has_vnni()}, "
              f"{args.iters} interleaved iterations per setting")
        for batch, threads in SETTINGS:
            stats = ortbench.time_sessions(list(paths.values()), batch=batch,
                                           config=ortbench.SessionConfig(threads=threads),
                                           warmup=args.warmup, iters=args.iters)
            print(f"\nbatch {batch}, {threads} thread(s)")
            print(f"{'model':<36}{'p50 (ms)':>10}{'p90 (ms)':>10}{'vs FP32':>9}")
            for name, s in zip(paths, stats):
                print(f"{name:<36}{s.p50:>10.3f}{s.p90:>10.3f}{stats[0].p50 / s.p50:>8.2f}x")


if __name__ == "__main__":
    main()
