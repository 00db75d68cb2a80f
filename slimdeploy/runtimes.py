"""Inference runtimes that run the exported models: onnxruntime and OpenVINO read the ONNX files,
ExecuTorch runs a .pte program exported beside them.

Every runtime in `RUNTIMES` has the same face: ``available()``, ``prepare(model, onnx_path, input_shape,
max_batch)`` giving the file it loads, ``prepare_int8(model, int8_onnx_path, input_shape, max_batch,
calibration)`` the same for INT8 (the QDQ file itself, or a program quantized on its own), ``load(path, threads)`` giving a loaded model with ``run(inputs) -> logits`` and ``describe()``
(version, device, the inference precision actually used, threads). `verify` checks a loaded model against
PyTorch, `time_models` times loaded models interleaved as `ortbench.time_sessions` does (`load_interleaved`
loads them for it).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimdeploy.export import ExportError, ExportMismatchError, eval_mode, first_line
from slimdeploy.ortbench import LatencyStats, OrtPredictor, SessionConfig, latency_stats
from slimdeploy.registry import Registry

# Least tolerance (relative to max |logit|) per inference precision. A float32 runtime gets the export
# tolerance, as onnxruntime does; bf16 keeps 8 significant bits (relative rounding 2^-8 ≈ 4e-3 per
# operation, compounding over a network's layers), f16 keeps 11.
PRECISION_TOLERANCE = {"f32": 0.0, "bf16": 2e-2, "f16": 1e-2}


def _onnx_file(model: nn.Module, onnx_path, input_shape: tuple[int, ...], max_batch: int) -> Path:
    """A runtime that reads ONNX loads the exported file itself: its batch axis is already dynamic."""
    return Path(onnx_path)


def _int8_onnx_file(model: nn.Module, int8_onnx_path, input_shape: tuple[int, ...], max_batch: int,
                    calibration: torch.Tensor) -> Path:
    """A runtime that reads ONNX runs the quantized (QDQ) file as it is, with its own INT8 kernels."""
    return Path(int8_onnx_path)


class OnnxRuntime:
    """onnxruntime in a session set up by an `ortbench.SessionConfig`."""

    name = "onnxruntime"
    install_hint = "pip install onnxruntime"
    prepare = staticmethod(_onnx_file)
    prepare_int8 = staticmethod(_int8_onnx_file)

    def __init__(self, path, config: SessionConfig):
        self.path, self.config = path, config
        try:
            self._predict = OrtPredictor(path, config)
        except Exception as err:  # onnxruntime's errors derive from Exception only
            raise ExportError(f"{path}: onnxruntime cannot load the model: {first_line(err)}") from err

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    @classmethod
    def load(cls, path, threads: int, spinning: bool = True) -> "OnnxRuntime":
        return cls(path, SessionConfig(threads=threads, spinning=spinning))

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return self._predict(inputs)

    def describe(self) -> dict:
        return {"runtime": self.name, "precision": "f32", **self.config.describe()}


class OpenVino:
    """OpenVINO on the CPU, compiled for latency with a fixed number of inference threads."""

    name = "openvino"
    install_hint = "pip install openvino"
    prepare = staticmethod(_onnx_file)
    prepare_int8 = staticmethod(_int8_onnx_file)  # QDQ nodes become its own INT8 kernels

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


class _XnnpackThreadPool:
    """ExecuTorch's thread pool: one per process, sized to the logical cores at first use. A program
    keeps the pool it was loaded with and resizing frees that pool, so a program loaded before a resize
    must not run again."""

    resizes = 0

    @staticmethod
    def size() -> int:
        from executorch.extension.pybindings import portable_lib

        return portable_lib._threadpool_get_thread_count()

    @classmethod
    def use(cls, threads: int) -> int:
        """Size the pool to ``threads``; returns the resize count, which marks the programs loaded since."""
        from executorch.extension.pybindings import portable_lib

        if cls.size() != threads:
            portable_lib._unsafe_reset_threadpool(threads)  # the only setter ExecuTorch's Python API has
            cls.resizes += 1
        return cls.resizes


class ExecuTorch:
    """An ExecuTorch program (.pte) with its convolutions delegated to XNNPACK, on the CPU."""

    name = "executorch"
    install_hint = "pip install -e .[executorch]"

    def __init__(self, path, threads: int):
        from executorch.runtime import Runtime
        from executorch.version import __version__

        self.path = path
        self._pool = _XnnpackThreadPool.use(threads)
        try:
            self._method = Runtime.get().load_program(Path(path)).load_method("forward")
        except Exception as err:  # the runtime raises RuntimeError or ValueError carrying its status code
            raise ExportError(f"{path}: ExecuTorch cannot load the program: {first_line(err)}") from err
        self.max_batch = self._method.metadata.input_tensor_meta(0).sizes()[0]
        self._description = {
            "runtime": self.name, "version": __version__, "device": "CPU (XNNPACK delegate)",
            "precision": "f32", "threads": _XnnpackThreadPool.size(),
            "threadpool": "one per process, shared by every program", "max_batch": self.max_batch,
        }

    @staticmethod
    def available() -> bool:
        return (importlib.util.find_spec("executorch") is not None
                and importlib.util.find_spec("executorch.runtime") is not None)

    @staticmethod
    def prepare(model: nn.Module, onnx_path, input_shape: tuple[int, ...], max_batch: int) -> Path:
        """Export a fresh program beside the ONNX file (dense.onnx -> dense.pte)."""
        from slimdeploy.executorch_export import export_pte, pte_path

        return export_pte(model, pte_path(onnx_path), input_shape, max_batch)

    @staticmethod
    def prepare_int8(model: nn.Module, int8_onnx_path, input_shape: tuple[int, ...], max_batch: int,
                     calibration: torch.Tensor) -> Path:
        """A program quantized by XNNPACK's own quantizer on the same calibration images (dense.int8.pte)."""
        from slimdeploy.executorch_export import export_pte_int8, pte_path

        return export_pte_int8(model, pte_path(int8_onnx_path), input_shape, max_batch, calibration)

    @classmethod
    def load(cls, path, threads: int) -> "ExecuTorch":
        return cls(path, threads)

    def run(self, inputs: np.ndarray) -> np.ndarray:
        if _XnnpackThreadPool.resizes != self._pool:
            raise ExportError(f"{self.path}: ExecuTorch's thread pool was resized after this program was "
                              f"loaded; load it again")
        if len(inputs) > self.max_batch:
            raise ExportError(f"{self.path}: batch {len(inputs)} exceeds the {self.max_batch} this program "
                              f"was exported for")
        return self._method.execute([torch.from_numpy(inputs)])[0].numpy()

    def describe(self) -> dict:
        return dict(self._description)


RUNTIMES: Registry[type] = Registry("runtime")
for _runtime in (OnnxRuntime, OpenVino, ExecuTorch):
    RUNTIMES.register(_runtime.name)(_runtime)  # described by its docstring


def prepare(name: str, model: nn.Module, onnx_path, input_shape: tuple[int, ...], max_batch: int) -> Path:
    """The file runtime ``name`` loads for ``model``, whose ONNX export is ``onnx_path``: that file for
    onnxruntime and OpenVINO, a fresh .pte beside it for ExecuTorch, taking batches up to ``max_batch``."""
    return RUNTIMES.get(name).prepare(model, onnx_path, input_shape, max_batch)


def check_runtime(name: str) -> str:
    """``name`` if it is a known, installed runtime; otherwise ValueError saying what is allowed."""
    runtime = RUNTIMES.get(name)
    if not runtime.available():
        raise ValueError(f"{name} is not installed; {runtime.install_hint}")
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


def load_interleaved(name: str, paths: list, threads: int) -> list:
    """Each file loaded in runtime ``name`` for `time_models` to time them interleaved: onnxruntime's idle
    pool threads then stop spinning, as in `ortbench.time_sessions` (see `ortbench.spinning_for`)."""
    runtime = RUNTIMES.get(name)
    if runtime is OnnxRuntime:
        return [OnnxRuntime(path, SessionConfig(threads=threads).for_timing(len(paths))) for path in paths]
    return [runtime.load(path, threads) for path in paths]


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
