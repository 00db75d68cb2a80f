"""Torch-side measurements: parameters, MACs, eager latency, ONNX Runtime peak memory."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():  # thop compares versions with the deprecated distutils API
    warnings.simplefilter("ignore", DeprecationWarning)
    import thop

from slimdeploy import ortbench
from slimdeploy.export import eval_mode
from slimdeploy.ortbench import LatencyStats, SessionConfig, latency_stats


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs for one image by thop's rules (conv/linear MACs, plus its per-element BN/pool counts).

    A deep copy is profiled so thop's `total_ops`/`total_params` buffers never touch `model`.
    """
    probe = copy.deepcopy(model).cpu().eval()
    macs, _ = thop.profile(probe, inputs=(torch.randn(1, *input_shape),), verbose=False)
    return int(macs)


def count_flop_counter_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs for one image from torch's FlopCounterMode (matmul/conv flops / 2)."""
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(torch.randn(1, *input_shape, device=_device(model)))
    return counter.get_total_flops() // 2


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def torch_latency(
    models: list[nn.Module],
    input_shape: tuple[int, ...],
    batch: int = 1,
    threads: int = 1,
    warmup: int = 20,
    iters: int = 200,
) -> list[LatencyStats]:
    """PyTorch eager latency per batch, models timed interleaved like ortbench.time_sessions."""
    x = torch.randn(batch, *input_shape)
    samples = [[] for _ in models]
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as stack, torch.no_grad():
            for model in models:
                stack.enter_context(eval_mode(model))
            for it in range(-warmup, iters):
                for k, model in enumerate(models):
                    t0 = time.perf_counter_ns()
                    model(x)
                    t1 = time.perf_counter_ns()
                    if it >= 0:
                        samples[k].append(t1 - t0)
    finally:
        torch.set_num_threads(prev_threads)
    return [latency_stats(s, batch, threads) for s in samples]


# Loads ortbench.py as a single file: importing the slimdeploy package would count torch in the peak.
_RSS_CHILD = """
import json, resource, runpy, sys
import numpy as np
ortbench = runpy.run_path(sys.argv[1])
path, batch, config = sys.argv[2], int(sys.argv[3]), ortbench["SessionConfig"](**json.loads(sys.argv[4]))
sess = ortbench["make_session"](path, config)
inp = sess.get_inputs()[0]
sess.run(None, {inp.name: np.zeros(ortbench["input_shape_for"](sess, batch), dtype=np.float32)})
try:  # VmHWM belongs to this process image; ru_maxrss on Linux can carry the parent's peak across exec
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(int(hwm.split()[1]) / 2**10)  # KiB
except OSError:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(rss / 2**20 if sys.platform == "darwin" else rss / 2**10)  # bytes on macOS, KiB elsewhere
"""


def peak_rss_mb(onnx_path, batch: int = 1, config: SessionConfig | None = None) -> float:
    """Peak RSS (MiB) of a fresh interpreter that loads the model in ORT and runs one batch, in a session
    set up by ``config`` (default: one thread)."""
    config_json = json.dumps(dataclasses.asdict(config or SessionConfig()))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, ortbench.__file__, str(onnx_path), str(batch), config_json],
        capture_output=True, text=True, check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def file_size(path) -> int:
    return os.path.getsize(path)
