"""ONNX export, numerical verification against PyTorch, and static INT8 quantisation."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import platform
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, create_calibrator, quantize_static,
    save_tensors_data,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from slimdeploy.errors import SlimdeployError
from slimdeploy.ortbench import SessionConfig, make_session


class ExportError(SlimdeployError, RuntimeError):
    """The model cannot be exported to ONNX or run in ONNX Runtime; the message is one line."""


class ExportMismatchError(ExportError):
    """ONNX Runtime output differs from the PyTorch model beyond tolerance."""


@dataclass
class ExportCheck:
    max_abs_diff: float
    max_abs_logit: float
    opset: int
    session: dict = field(default_factory=dict)  # SessionConfig.describe() of the session that ran it


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode, restoring each one's own flag on exit."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags.items():
            m.training = training


def on_cpu(model: nn.Module) -> nn.Module:
    """The model itself if it lives on CPU, otherwise a CPU copy."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temp path next to `path`; rename it over `path` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.onnx")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_onnx(model: nn.Module, path, input_shape: tuple[int, int, int], opset: int = 17) -> Path:
    """Export `model` (C, H, W input) to ONNX with a dynamic batch axis; return the path.

    The exporter is pinned to the TorchScript-based path (``dynamo=False``).  In torch
    2.14 the torch.export-based path (``dynamo=True``) emits opset 18 only: asking for
    opset 17 makes its down-conversion fail on ReduceMean and log a traceback, it prints
    progress lines on every call, takes seconds instead of ~0.1 s per small CNN and needs
    ``dynamic_shapes`` with a non-1 example batch.  The TorchScript path honours the
    requested opset, folds eval-mode BN into the convolutions, and handles residual adds,
    concatenations and ``dynamic_axes`` exactly; only its deprecation notice is silenced.
    Weights below 1.1e-19 are then set to zero (see `flush_negligible`).

    A model the exporter cannot handle raises `ExportError` with the exporter's first line; the
    graph dump it prints on failure is dropped.
    """
    path = Path(path)
    cpu_model = on_cpu(model)
    example = torch.randn(2, *input_shape)
    with eval_mode(cpu_model), atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r".*TorchScript-based ONNX export.*")
        try:
            with _output_dropped_on_failure():
                torch.onnx.export(
                    cpu_model,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    do_constant_folding=True,
                )
                proto = onnx.load(str(tmp))
                if flush_negligible(proto):
                    onnx.save(proto, str(tmp))
                onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:
            shape = "x".join(str(n) for n in input_shape)
            raise ExportError(f"{type(model).__name__} (input {shape}) -> {path.name}: ONNX export failed: "
                              f"{first_line(err)}") from err
    return path


def first_line(err: Exception) -> str:
    """An exception as one line: its type and first line, without the exporter's request for a pull
    request and the graph context it appends."""
    line = next((text.strip() for text in str(err).splitlines() if text.strip()), "")
    line = re.sub(r"\s*(Please feel free to request support|\[Caused by).*", "", line)
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


@contextlib.contextmanager
def _output_dropped_on_failure():
    """Capture stdout and stderr down to their file descriptors, where the exporter's C++ log writes
    (on failure, a dump of the whole graph): pass the text on if the block succeeds, drop it if the
    block raises."""
    with _fd_dropped_on_failure(1, sys.stdout), _fd_dropped_on_failure(2, sys.stderr):
        yield


def _flush_c_stdio() -> None:
    if os.name == "posix":
        ctypes.CDLL(None).fflush(None)  # C++ streams write through C's stdio buffers


@contextlib.contextmanager
def _fd_dropped_on_failure(fd: int, stream):
    stream.flush()
    _flush_c_stdio()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            stream.flush()
            _flush_c_stdio()
            os.dup2(saved, fd)
            os.close(saved)
        captured.seek(0)  # reached only when the block succeeded
        stream.write(captured.read().decode(errors="replace"))


# Below √(smallest normal float32): the product of two such numbers is subnormal.
NEGLIGIBLE = float(np.sqrt(np.finfo(np.float32).tiny))  # ≈ 1.1e-19


def flush_negligible(proto: onnx.ModelProto, below: float = NEGLIGIBLE) -> int:
    """Set float32 initializers with 0 < |w| < `below` to zero in place; return how many.

    Sparse training drives pruned-away γ geometrically towards zero, so folding BN into the
    convolutions leaves whole filters of weights around 1e-20…1e-45.  They change no output
    visibly, but their products are subnormal and x86 CPUs compute on subnormals in microcode:
    a proximal-NS ResNet-20 ran 48× slower in onnxruntime (58 ms vs 1.2 ms at batch 1) until
    they were set to zero, with bit-identical logits.
    """
    flushed = 0
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        array = onnx.numpy_helper.to_array(init)
        negligible = (array != 0) & (np.abs(array) < below)
        if negligible.any():
            flushed += int(negligible.sum())
            init.CopyFrom(onnx.numpy_helper.from_array(np.where(negligible, np.float32(0), array), init.name))
    return flushed


def _opset_of(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# onnxruntime's own thread count (one per physical core): verification is not timed.
VERIFY_SESSION = SessionConfig(threads=0)


def verify_onnx(model: nn.Module, path, inputs: torch.Tensor, tolerance: float = 1e-4,
                session: SessionConfig = VERIFY_SESSION) -> ExportCheck:
    """Compare ONNX Runtime against the PyTorch model on one batch, in a session set up by ``session``
    (recorded in the result).

    Raises ExportError if ONNX Runtime cannot run the file, ExportMismatchError if
    max|ORT - PyTorch| > tolerance * max|logit|.
    """
    path = Path(path)
    cpu_model = on_cpu(model)
    x = inputs.detach().float().cpu()
    with eval_mode(cpu_model), torch.no_grad():
        expected = cpu_model(x).numpy()
    try:
        got = make_session(path, session).run(["logits"], {"input": x.numpy()})[0]
    except Exception as err:  # onnxruntime's errors derive from Exception only
        raise ExportError(f"{path}: ONNX Runtime cannot run the export: {first_line(err)}") from err
    check = ExportCheck(
        max_abs_diff=float(np.max(np.abs(got - expected))),
        max_abs_logit=float(np.max(np.abs(expected))),
        opset=_opset_of(path),
        session=session.describe(),
    )
    if not check.max_abs_diff <= tolerance * check.max_abs_logit:
        raise ExportMismatchError(
            f"{path}: max |ORT - PyTorch| = {check.max_abs_diff:.3e} exceeds "
            f"{tolerance:g} x max |logit| = {tolerance:g} x {check.max_abs_logit:.3e}"
        )
    return check


class _BatchReader(CalibrationDataReader):
    """CalibrationDataReader over one array, fed in small batches."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int):
        self._batches = iter(
            [{input_name: data[i : i + batch]} for i in range(0, len(data), batch)]
        )

    def get_next(self):
        return next(self._batches, None)


INT8_TARGETS = ("x86", "arm")
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
INT8_METADATA_KEY = "slimdeploy.int8"


def resolve_int8_target(target: str = "auto", machine: str | None = None) -> str:
    """``x86`` or ``arm``; ``auto`` is this machine's architecture, where anything not x86 gets arm's
    S8S8 (also onnxruntime's default QDQ types)."""
    if target != "auto":
        _check_choice("int8 target", target, INT8_TARGETS)
        return target
    machine = (machine or platform.machine()).lower()
    return "x86" if machine in _X86_MACHINES else "arm"


def cpu_has_vnni() -> bool:
    """Whether this CPU has the 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni"))


def int8_types(target: str, vnni: bool | None = None) -> dict:
    """`quantize_int8`'s type keywords for an ``x86`` or ``arm`` target, per onnxruntime's guidance.

    x86 kernels multiply U8 activations by S8 weights (S8S8 runs slower there). Without VNNI they
    add pairs of U8·S8 products in int16, which can saturate, so weights get 7 bits (reduce_range);
    ``vnni`` defaults to this CPU's. ARM kernels favour S8 activations and weights.
    """
    _check_choice("int8 target", target, INT8_TARGETS)
    if target == "arm":
        return {"activation": "int8", "weights": "int8", "reduce_range": False}
    vnni = cpu_has_vnni() if vnni is None else vnni
    return {"activation": "uint8", "weights": "int8", "reduce_range": not vnni}


def _check_choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def quantize_int8(
    onnx_path,
    out_path,
    calibration: np.ndarray,
    *,
    activation: str = "uint8",
    weights: str = "int8",
    method: str = "minmax",
    reduce_range: bool = False,
    batch: int = 8,
) -> Path:
    """Static INT8 quantisation: QDQ format, per-channel weights; returns ``out_path``.

    ``activation`` and ``weights`` are ``uint8`` or ``int8`` (`int8_types` gives a target's),
    ``method`` calibrates the activation ranges on ``calibration`` (N, C, H, W): ``minmax``,
    ``entropy`` or ``percentile``; ``reduce_range`` quantises weights to 7 bits. The choices are
    recorded as JSON in the model's metadata under ``slimdeploy.int8``.
    """
    _check_choice("activation", activation, _QUANT_TYPES)
    _check_choice("weights", weights, _QUANT_TYPES)
    _check_choice("calibration method", method, CALIBRATION_METHODS)
    out_path = Path(out_path)
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    input_name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as work, atomic_path(out_path) as tmp:
        # Shape inference + graph cleanup gives the quantiser complete shapes to work with.
        pre = Path(work) / "preprocessed.onnx"
        quant_pre_process(str(onnx_path), str(pre))
        ranges = _calibrate(pre, _BatchReader(input_name, data, batch), method, Path(work))
        quantize_static(
            str(pre),
            str(tmp),
            None,  # the activation ranges come from the calibration file
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=_QUANT_TYPES[activation],
            weight_type=_QUANT_TYPES[weights],
            calibrate_method=CALIBRATION_METHODS[method],
            calibration_cache_path=ranges,
        )
        choices = {"format": "QDQ", "activation": activation, "weights": weights, "per_channel": True,
                   "reduce_range": reduce_range, "calibration": method, "calibration_images": len(data)}
        _add_metadata(tmp, INT8_METADATA_KEY, json.dumps(choices))
    return out_path


# Calibrator options quantize_static does not pass on. Its entropy histogram has 128 bins, as many as
# the quantized bins it searches, which leaves the full range as the only candidate (entropy would
# equal minmax); 2048 bins, as TensorRT's and PyTorch's histogram observers use. (MinMax's
# max_intermediate_outputs is left alone: onnxruntime 1.32 drops the batches it should fold in.)
_CALIBRATOR_OPTIONS = {"minmax": {}, "entropy": {"num_bins": 2048}, "percentile": {}}


def _calibrate(model: Path, reader: CalibrationDataReader, method: str, work: Path) -> Path:
    """Activation ranges of `model` with onnxruntime's calibrator, saved where quantize_static reads them."""
    calibrator = create_calibrator(model, augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=CALIBRATION_METHODS[method],
                                   extra_options=_CALIBRATOR_OPTIONS[method])
    with contextlib.redirect_stdout(None):  # the histogram calibrators print progress
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, work / "ranges.json")
    return work / "ranges.json"


def _add_metadata(path: Path, key: str, value: str) -> None:
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, key: value})
    onnx.save(proto, str(path))


def int8_metadata(path) -> dict:
    """What `quantize_int8` recorded in a model: types, reduce_range, calibration method and images."""
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if INT8_METADATA_KEY not in props:
        raise ValueError(f"{path}: no {INT8_METADATA_KEY} metadata; not written by quantize_int8")
    return json.loads(props[INT8_METADATA_KEY])
