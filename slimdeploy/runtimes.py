"""Inference runtimes that run the exported ONNX files: onnxruntime and OpenVINO.

Every runtime in `RUNTIMES` has the same face: ``available()``, ``load(path, threads)`` giving a loaded
model with ``run(inputs) -> logits`` and ``describe()`` (version, device, the inference precision
actually used, threads). `verify` checks a loaded model against PyTorch, `time_models` times loaded
models interleaved as `ortbench.time_sessions` does.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import torch
from torch import nn

from slimdeploy import ortbench
from slimdeploy.export import ExportError, ExportMismatchError, eval_mode, first_line
from slimdeploy.ortbench import LatencyStats, latency_stats

# Least tolerance (relative to max |logit|) per inference precision. A float32 runtime gets the export
# tolerance, as onnxruntime does; bf16 keeps 8 significant bits (relative rounding 2^-8 ≈ 4e-3 per
# operation, compounding over a network's layers), f16 keeps 11.
PRECISION_TOLERANCE = {"f32": 0.0, "bf16": 2e-2, "f16": 1e-2}


class OnnxRuntime:
    """onnxruntime's CPU execution provider, with the session settings of `ortbench`."""

    name = "onnxruntime"
    install_hint = "pip install onnxruntime"

    def __init__(self, path, threads: int, spinning: bool = True):
        self.path, self.threads, self.spinning = path, threads, spinning
        try:
            self._session = ortbench.make_session(path, threads, spinning=spinning)
        except Exception as err:  # onnxruntime's errors derive from Exception only
            raise ExportError(f"{path}: onnxruntime cannot load the model: {first_line(err)}") from err
        self._input = self._session.get_inputs()[0].name

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    @classmethod
    def load(cls, path, threads: int, spinning: bool = True) -> "OnnxRuntime":
        return cls(path, threads, spinning)

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: inputs})[0]

    def describe(self) -> dict:
        return {"runtime": self.name, "precision": "f32",
                **ortbench.session_options_dict(self.threads, spinning=self.spinning)}


class OpenVino:
    """OpenVINO on the CPU, compiled for latency with a fixed number of inference threads."""

    name = "openvino"
    install_hint = "pip install openvino"

    def __init__(self, path, threads: int):
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        self.path = path
        core = ov.Core()
        # Unpinned, as onnxruntime's threads: on a shared 2-core machine a thread pinned to a busy core
        # waited there (ResNet-20, batch 1, 1 thread: 6.5 ms pinned, 2.3 ms unpinned, interleaved).
        config = {props.inference_num_threads: threads, hints.performance_mode: hints.PerformanceMode.LATENCY,
                  hints.enable_cpu_pinning: False}
        try:
            self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as err:  # OpenVINO raises RuntimeError or its own Exception subclasses
            raise ExportError(f"{path}: OpenVINO cannot load the model: {first_line(err)}") from err
        self._request = self._compiled.create_infer_request()
        get = self._compiled.get_property
        self._description = {
            "runtime": self.name,
            "version": ov.get_version(),
            "device": f"CPU ({core.get_property('CPU', props.device.full_name)})",
            # what the plugin chose: bf16 or f16 where the CPU computes them natively, else f32
            "precision": get(hints.inference_precision).get_type_name(),
            "threads": int(get(props.inference_num_threads)),
            "performance_hint": str(get(hints.performance_mode)),
            "streams": int(get(props.num_streams)),
            "cpu_pinning": bool(get(hints.enable_cpu_pinning)),
        }

    @staticmethod
    def available() -> bool:
        try:  # an install whose native libraries fail to load counts as missing
            import openvino  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def load(cls, path, threads: int) -> "OpenVino":
        return cls(path, threads)

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return self._request.infer({0: inputs}, share_inputs=True)[0]

    def describe(self) -> dict:
        return dict(self._description)


RUNTIMES = {runtime.name: runtime for runtime in (OnnxRuntime, OpenVino)}


def check_runtime(name: str) -> str:
    """``name`` if it is a known, installed runtime; otherwise ValueError saying what is allowed."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; allowed: {', '.join(RUNTIMES)}")
    if not RUNTIMES[name].available():
        raise ValueError(f"{name} is not installed; {RUNTIMES[name].install_hint}")
    return name


def tolerance_for(precision: str, tolerance: float) -> float:
    """The tolerance a runtime computing in ``precision`` is held to, given the float32 one."""
    return max(tolerance, PRECISION_TOLERANCE.get(precision, 0.0))


def verify(loaded, model: nn.Module, inputs: torch.Tensor, tolerance: float) -> dict:
    """Compare a loaded runtime against the (CPU) PyTorch model on one batch; its description plus the
    error. Raises ExportMismatchError if max |runtime - PyTorch| exceeds the tolerance for the precision
    the runtime used, relative to max |logit|."""
    x = inputs.detach().float().cpu().contiguous()
    with eval_mode(model), torch.no_grad():
        expected = model(x).numpy()
    got = loaded.run(x.numpy())
    info = loaded.describe()
    allowed = tolerance_for(info["precision"], tolerance)
    diff, peak = float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected)))
    if not diff <= allowed * peak:
        raise ExportMismatchError(
            f"{loaded.path}: max |{loaded.name} ({info['precision']}) - PyTorch| = {diff:.3e} exceeds "
            f"{allowed:g} x max |logit| = {allowed:g} x {peak:.3e}")
    return {**info, "max_abs_diff": diff, "max_abs_logit": peak, "tolerance": allowed}


def time_models(loaded: list, input_shape: tuple[int, ...], batch: int, warmup: int, iters: int,
                threads: int) -> list[LatencyStats]:
    """Time each loaded model `iters` times, interleaved (A B A B ...), after `warmup` discarded rounds;
    all get the same random batch of (batch, *input_shape)."""
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    samples = [np.empty(iters, dtype=np.int64) for _ in loaded]
    for it in range(-warmup, iters):
        for k, model in enumerate(loaded):
            t0 = time.perf_counter_ns()
            model.run(x)
            t1 = time.perf_counter_ns()
            if it >= 0:
                samples[k][it] = t1 - t0
    return [latency_stats(s, batch, threads) for s in samples]
