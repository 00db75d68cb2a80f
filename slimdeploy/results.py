"""The run report as types: what report.json holds, written by the pipeline and read by the renderers
and ``slimdeploy compare``.

``to_json()`` gives report.json's object; field names are its keys, so keys may be added between
versions but never renamed or removed. ``RunReport.from_json`` reads a file back, checking every type,
and refuses a ``schema_version`` it does not know. Reports written before the version field existed
read as version 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from slimdeploy.errors import InputError
from slimdeploy.ortbench import LatencyStats

SCHEMA_VERSION = 1
READABLE_VERSIONS = (1,)


class ReportError(InputError):
    """A report file that cannot be read: missing, not JSON, another schema version, or keys of the wrong type."""


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


class _Record:
    """JSON in and out: nested dicts become the annotated dataclasses, their types checked by pydantic."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict):
        return _adapter(cls).validate_python(raw)


@dataclass(frozen=True)
class Percentiles(_Record):
    p50: float  # ms per batch
    p90: float
    p99: float

    @classmethod
    def of(cls, stats: LatencyStats) -> Percentiles:
        return cls(stats.p50, stats.p90, stats.p99)


@dataclass(frozen=True, kw_only=True)
class ModelSummary(_Record):
    """One model (dense or pruned): size, cost, accuracy and, with an export, its ONNX file."""

    params: int
    macs: int  # multiply-accumulates for one input, counted by thop
    flops: int  # 2 × macs
    macs_flop_counter: int  # the same, counted by torch.utils.flop_counter
    accuracy: float | None  # top-1 (%) on the test split
    onnx: str | None
    latency_ms: Percentiles | None  # onnxruntime, first bench setting
    onnx_bytes: int | None = None
    peak_rss_mb: float | None = None  # onnxruntime loading the file and running one batch


@dataclass(frozen=True)
class LayerWidth(_Record):
    name: str
    before: int
    after: int


@dataclass(frozen=True)
class ZeroedGammaCheck(_Record):
    """Pruned model vs the dense one with the removed channels' γ and β zeroed: equal up to compensation."""

    max_abs_diff: float
    max_abs_logit: float
    images: int


@dataclass(frozen=True)
class ProximalSummary(_Record):
    """Proximal NS: how many ξ are exactly zero, and how large the γ of those channels still are."""

    xi_zeros: int
    channels: int
    gamma_nonzero_at_xi_zero: int
    gamma_max_abs_at_xi_zero: float
    gamma_mean_abs_at_xi_zero: float


@dataclass(frozen=True, kw_only=True)
class PruningSummary(_Record):
    how: str
    channels_total: int
    channels_kept: int
    groups: int
    score_cut: float | None
    round_to: int | None
    seconds: float  # planning and surgery
    compensated: str
    error_vs_zeroed_gamma: ZeroedGammaCheck
    layers: list[LayerWidth]
    proximal: ProximalSummary | None = None
    bn_recalibration_images: int = 0  # BN statistics re-estimated on these training images after pruning


@dataclass(frozen=True, kw_only=True)
class SparsitySummary(_Record):
    """The recipe's sparsity section."""

    method: str
    penalty: str
    lam: float
    p: float
    a: float | None
    beta: float
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ExportSummary(_Record):
    """ONNX against PyTorch on the export check batch (pruned model; the dense one's error beside it)."""

    max_abs_diff: float
    max_abs_logit: float
    opset: int
    tolerance: float
    dense_max_abs_diff: float
    dense_max_abs_logit: float
    session: dict | None = None  # the onnxruntime session the check ran in (SessionConfig.describe())


@dataclass(frozen=True, kw_only=True)
class LatencyRow(_Record):
    """Dense and pruned timed interleaved in one backend at one batch size and thread count."""

    backend: str  # onnxruntime, openvino, pytorch
    batch: int
    threads: int
    session: dict | None = None  # the runtime's settings (None for PyTorch eager)
    dense: LatencyStats
    pruned: LatencyStats

    @property
    def speedup(self) -> float:
        return self.dense.p50 / self.pruned.p50


@dataclass(frozen=True)
class Speedup(_Record):
    dense: float
    pruned: float


@dataclass(frozen=True, kw_only=True)
class Int8LatencyRow(_Record):
    """One runtime's latency of the INT8 models, with the FP32 ones timed interleaved beside them."""

    backend: str = "onnxruntime"  # reports written before other runtimes ran INT8 timed it in onnxruntime
    batch: int
    threads: int
    session: dict | None = None  # the runtime's settings (its describe())
    dense_fp32: LatencyStats
    pruned_fp32: LatencyStats
    dense: LatencyStats
    pruned: LatencyStats
    speedup_vs_fp32: Speedup


@dataclass(frozen=True, kw_only=True)
class Int8Model(_Record):
    onnx: str
    onnx_bytes: int
    accuracy: float  # top-1 (%) of the INT8 file in onnxruntime
    fp32_accuracy: float  # the same for the FP32 file it was quantized from
    accuracy_by_runtime: dict[str, float] = field(default_factory=dict)  # the INT8 file in each other runtime


@dataclass(frozen=True, kw_only=True)
class Int8Summary(_Record):
    target: str  # x86 or arm
    activation: str
    weights: str
    reduce_range: bool
    format: str
    calibration: str
    calibration_images: int
    latency: list[Int8LatencyRow]
    dense: Int8Model
    pruned: Int8Model


@dataclass(frozen=True)
class StageHistory(_Record):
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # one entry per epoch


@dataclass(frozen=True, kw_only=True)
class RunReport(_Record):
    schema_version: int = SCHEMA_VERSION
    recipe: str
    model: str
    dataset: str
    device: str
    dense: ModelSummary
    pruned: ModelSummary
    pruned_no_finetune_accuracy: float | None
    macs_counter: str = "thop"
    pruning: PruningSummary
    sparsity: SparsitySummary
    export: ExportSummary | None
    int8: Int8Summary | None = None
    runtimes: dict[str, dict] = field(default_factory=dict)  # each runtime's check against PyTorch
    latency: list[LatencyRow]
    train: StageHistory
    finetune: StageHistory

    def onnxruntime_rows(self) -> list[LatencyRow]:
        return [row for row in self.latency if row.backend == "onnxruntime"]

    @classmethod
    def from_json(cls, path: str | Path) -> RunReport:
        """Read a report.json; raises ReportError (one line naming the file) if it cannot."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ReportError(f"{path}: cannot read a report ({type(err).__name__})") from None
        if not isinstance(raw, dict):
            raise ReportError(f"{path}: not a slimdeploy report (no JSON object)")
        version = raw.get("schema_version", 1)
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            readable = ", ".join(map(str, READABLE_VERSIONS))
            raise ReportError(f"{path}: report schema_version {version!r} cannot be read; this slimdeploy reads "
                              f"version {readable}")
        try:
            return cls.from_dict(raw)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(map(str, first["loc"]))
            raise ReportError(f"{path}: not a slimdeploy report: {key}: {first['msg']}") from None
