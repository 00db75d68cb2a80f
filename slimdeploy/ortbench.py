"""ONNX Runtime latency benchmark; needs only numpy and onnxruntime.

Self-contained so it can be copied to an edge device and run as a script:

    python ortbench.py dense.onnx pruned.onnx --batch 1 --threads 1 --json out.json

Models are timed interleaved (A B A B ...) so that drift of the machine (thermal
throttling, background load) affects every model alike.

Every onnxruntime session slimdeploy opens is made here (`make_session`), set up by a `SessionConfig`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnxruntime as ort


@dataclass
class LatencyStats:
    p50: float  # ms per batch
    p90: float
    p99: float
    mean: float
    std: float
    throughput: float  # images/s, from the mean latency
    batch: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(samples_ns, batch: int, threads: int) -> LatencyStats:
    """Summarise per-batch wall times given in nanoseconds."""
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return LatencyStats(
        p50=float(p50), p90=float(p90), p99=float(p99), mean=mean, std=float(ms.std()),
        throughput=batch * 1000.0 / mean, batch=batch, threads=threads,
    )


# onnxruntime's graph optimisation levels by the names SessionConfig takes.
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
SPINNING_KEY = "session.intra_op.allow_spinning"


@dataclass(frozen=True)
class SessionConfig:
    """How an onnxruntime session is set up. Verification, accuracy, memory and timing all build their
    sessions from one of these, so they run under settings a report can state.

    ``threads`` is onnxruntime's intra-op pool size (0: its default, one per physical core),
    ``spinning`` whether idle pool threads spin-wait (see `spinning_for`), ``opt_level`` one of
    `OPT_LEVELS`.
    """

    threads: int = 1
    spinning: bool = True
    provider: str = "CPUExecutionProvider"
    opt_level: str = "all"

    def __post_init__(self):
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an integer >= 0 (0: onnxruntime's default), got {self.threads!r}")
        if self.opt_level not in OPT_LEVELS:
            raise ValueError(f"opt_level must be one of {', '.join(OPT_LEVELS)}, got {self.opt_level!r}")
        if self.provider not in ort.get_available_providers():
            raise ValueError(f"provider {self.provider!r} is not available; this onnxruntime has "
                             f"{', '.join(ort.get_available_providers())}")

    def options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[self.opt_level])
        opts.log_severity_level = 3  # errors only
        if not self.spinning:
            opts.add_session_config_entry(SPINNING_KEY, "0")
        return opts

    def describe(self) -> dict:
        """The settings as a report records them."""
        return {
            "provider": self.provider,
            "intra_op_num_threads": self.threads,
            "inter_op_num_threads": 1,
            "intra_op_spinning": self.spinning,
            "execution_mode": "ORT_SEQUENTIAL",
            "graph_optimization_level": OPT_LEVELS[self.opt_level],
            "onnxruntime": ort.__version__,
        }

    def for_timing(self, n_models: int) -> "SessionConfig":
        """The settings for timing ``n_models`` sessions interleaved: spinning off for several."""
        return replace(self, spinning=self.spinning and spinning_for(n_models))


def make_session(path, config: SessionConfig | None = None, *,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """A session on an ONNX file, or on a serialized model given as bytes; with ``profile_prefix``,
    onnxruntime profiles it into a JSON file of that prefix (see `profile_events`)."""
    config = config or SessionConfig()
    opts = config.options()
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, opts, providers=[config.provider])


class OrtPredictor:
    """An onnxruntime session as a function: a float32 batch in, the first output (the logits) out."""

    def __init__(self, path, config: SessionConfig | None = None):
        self.session = make_session(path, config)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def spinning_for(n_models: int) -> bool:
    """Whether timed sessions keep onnxruntime's default spin-waiting pool threads.

    Timed interleaved, the idle sessions' pool threads spin and steal the cores of the one that
    runs: ResNet-56 at batch 64 on 2 threads took 123 ms interleaved with spinning, 80 ms alone
    and 80 ms interleaved without it. So only a model timed alone keeps the default.
    """
    return n_models == 1


def input_shape_for(session: ort.InferenceSession, batch: int) -> tuple[int, ...]:
    """Shape of the model's first input with its dynamic batch axis set to `batch`."""
    inp = session.get_inputs()[0]
    dims = list(inp.shape)
    if not isinstance(dims[0], int) or dims[0] < 0:
        dims[0] = batch
    elif dims[0] != batch:
        raise ValueError(f"{inp.name!r} has a fixed batch of {dims[0]}, not {batch}")
    if any(not isinstance(d, int) or d < 0 for d in dims[1:]):
        raise ValueError(f"{inp.name!r} has dynamic non-batch dims: {inp.shape}")
    return tuple(dims)


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc="timing", unit="it")
        except ImportError:
            pass
    return None


def _random_feeds(sessions: list, batch: int) -> list[dict]:
    """One random input per session; sessions with equal input shapes get the same array."""
    rng = np.random.default_rng(0)
    inputs: dict[tuple, np.ndarray] = {}
    feeds = []
    for sess in sessions:
        shape = input_shape_for(sess, batch)
        if shape not in inputs:
            inputs[shape] = rng.standard_normal(shape, dtype=np.float32)
        feeds.append({sess.get_inputs()[0].name: inputs[shape]})
    return feeds


def time_sessions(
    paths: list,
    batch: int = 1,
    *,
    config: SessionConfig | None = None,
    warmup: int = 20,
    iters: int = 200,
    progress: bool = False,
) -> list[LatencyStats]:
    """Time each model `iters` times, interleaved, after `warmup` discarded rounds, in sessions set up
    by ``config.for_timing(len(paths))``."""
    config = (config or SessionConfig()).for_timing(len(paths))
    sessions = [make_session(p, config) for p in paths]
    feeds = _random_feeds(sessions, batch)
    outputs = [[o.name for o in s.get_outputs()] for s in sessions]

    samples = [np.empty(iters, dtype=np.int64) for _ in sessions]
    bar = _progress(warmup + iters, progress)
    for it in range(-warmup, iters):
        for k, (sess, feed, out) in enumerate(zip(sessions, feeds, outputs)):
            t0 = time.perf_counter_ns()
            sess.run(out, feed)
            t1 = time.perf_counter_ns()
            if it >= 0:
                samples[k][it] = t1 - t0
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return [latency_stats(s, batch, config.threads) for s in samples]


def time_quietest(paths: list, batch: int = 1, *, config: SessionConfig | None = None, warmup: int = 20,
                  iters: int = 200, blocks: int = 5) -> list[LatencyStats]:
    """:func:`time_sessions` run ``blocks`` times; the run whose first model had the lowest p50.

    On a shared CPU other tenants slow whole stretches of up to seconds: ResNet-20 at batch 1 took
    0.63 ms in quiet stretches and 0.85-0.95 ms in slowed ones, alternating. A slowed stretch adds a cost
    to every call, which shrinks a speedup (2.25x read as 1.75x), so a comparison is read from the
    quietest run. Give it blocks that together last a few seconds."""
    runs = [time_sessions(paths, batch, config=config, warmup=warmup, iters=iters) for _ in range(blocks)]
    return min(runs, key=lambda stats: stats[0].p50)


def profile_events(path, batch: int = 1, config: SessionConfig | None = None, runs: int = 20) -> list[dict]:
    """onnxruntime's profile of `runs` batches of random input: its trace events (``cat`` ``Node``
    events carry each kernel's ``dur`` in µs). The profile file is written to a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        session = make_session(path, config, profile_prefix=os.path.join(folder, "profile"))
        (feed,) = _random_feeds([session], batch)
        for _ in range(runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            return json.load(f)


# --- Latency tables: one convolution at a time ------------------------------------------------------
# The models are written with a minimal protobuf encoder because this file must run where only numpy
# and onnxruntime are installed (no `onnx` package); field numbers are those of onnx/onnx.proto.

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _pb_bytes(field: int, payload) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _pb_value_info(name: str, channels: int, hw) -> bytes:
    """ValueInfoProto of a float tensor [batch, channels, *hw] with a symbolic batch."""
    dims = _pb_bytes(1, _pb_bytes(2, "batch")) + b"".join(_pb_bytes(1, _pb_int(1, d)) for d in (channels, *hw))
    return _pb_bytes(1, name) + _pb_bytes(2, _pb_bytes(1, _pb_int(1, 1) + _pb_bytes(2, dims)))


def _pb_initializer(name: str, array: np.ndarray) -> bytes:
    dims = b"".join(_pb_int(1, d) for d in array.shape)
    return dims + _pb_int(2, 1) + _pb_bytes(8, name) + _pb_bytes(9, array.astype("<f4").tobytes())


def _pb_attr_ints(name: str, values) -> bytes:
    if isinstance(values, int):
        return _pb_bytes(1, name) + _pb_int(3, values) + _pb_int(20, 2)  # AttributeType INT
    return _pb_bytes(1, name) + b"".join(_pb_int(8, v) for v in values) + _pb_int(20, 7)  # INTS


@dataclass(frozen=True)
class ConvSpec:
    """One Conv layer as the runtime sees it (eval-mode BN folded into its bias), at one batch size 1
    input ``[1, in_ch, *hw]``; the batch is set when timing."""

    in_ch: int
    out_ch: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    hw: tuple

    @classmethod
    def from_dict(cls, raw: dict) -> "ConvSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def key(self) -> str:
        def join(t):
            return "x".join(str(v) for v in t)
        return (f"conv{self.in_ch}-{self.out_ch}-k{join(self.kernel)}-s{join(self.stride)}-p{join(self.padding)}"
                f"-d{join(self.dilation)}-g{self.groups}-{join(self.hw)}")

    def out_hw(self) -> tuple:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                     for size, p, d, k, s in zip(self.hw, self.padding, self.dilation, self.kernel, self.stride))

    def onnx_bytes(self, opset: int = 17) -> bytes:
        """A model computing just this Conv (with bias), random weights, dynamic batch."""
        rng = np.random.default_rng(0)
        weight = rng.standard_normal((self.out_ch, self.in_ch // self.groups, *self.kernel), dtype=np.float32)
        bias = rng.standard_normal(self.out_ch, dtype=np.float32)
        attrs = [_pb_attr_ints("kernel_shape", self.kernel), _pb_attr_ints("strides", self.stride),
                 _pb_attr_ints("pads", (*self.padding, *self.padding)),
                 _pb_attr_ints("dilations", self.dilation), _pb_attr_ints("group", self.groups)]
        node = (_pb_bytes(1, "x") + _pb_bytes(1, "w") + _pb_bytes(1, "b") + _pb_bytes(2, "y") + _pb_bytes(4, "Conv")
                + b"".join(_pb_bytes(5, a) for a in attrs))
        graph = (_pb_bytes(1, node) + _pb_bytes(2, "conv") + _pb_bytes(5, _pb_initializer("w", weight))
                 + _pb_bytes(5, _pb_initializer("b", bias))
                 + _pb_bytes(11, _pb_value_info("x", self.in_ch, self.hw))
                 + _pb_bytes(12, _pb_value_info("y", self.out_ch, self.out_hw())))
        opset_id = _pb_bytes(1, "") + _pb_int(2, opset)
        return _pb_int(1, 8) + _pb_bytes(8, opset_id) + _pb_bytes(7, graph)  # IR version 8


# Timed like a layer to absorb what every session.run costs whatever the layer: subtracting it leaves
# what a layer adds inside a whole model.
CALL_OVERHEAD_SPEC = ConvSpec(1, 1, (1, 1), (1, 1), (0, 0), (1, 1), 1, (1, 1))
CALL_OVERHEAD_KEY = "call"


def table_settings(batch: int, threads: int) -> dict:
    """What a latency table depends on besides the layers."""
    return {"batch": batch, "threads": threads, "onnxruntime": ort.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


def time_layers(specs, batch: int = 1, *, config: SessionConfig | None = None, warmup: int = 10,
                iters: int = 50) -> dict[str, float]:
    """Median latency (ms) of each ConvSpec run alone, by its key, plus the per-call overhead (``call``)."""
    table = {}
    for spec in [CALL_OVERHEAD_SPEC, *specs]:
        key = CALL_OVERHEAD_KEY if spec is CALL_OVERHEAD_SPEC else spec.key()
        if key not in table:
            table[key] = time_sessions([spec.onnx_bytes()], batch, config=config, warmup=warmup, iters=iters)[0].p50
    return table


def build_table_file(layers_path, out_path, batch: int, config: SessionConfig, warmup: int, iters: int) -> dict:
    """Time the layers a JSON description lists (``{"key": ..., "layers": [ConvSpec fields, ...]}``) and
    write the table ``{"key", "settings", "entries": {layer key: ms}}``."""
    with open(layers_path) as f:
        description = json.load(f)
    if not isinstance(description, dict) or not isinstance(description.get("layers"), list):
        raise ValueError(f"{layers_path}: expected a JSON object with a list under 'layers'")
    try:
        specs = [ConvSpec.from_dict(raw) for raw in description["layers"]]
    except TypeError as err:
        raise ValueError(f"{layers_path}: a layer is not a conv description ({err})") from None
    table = {"key": description.get("key"), "settings": table_settings(batch, config.threads),
             "entries": time_layers(specs, batch, config=config, warmup=warmup, iters=iters)}
    with open(out_path, "w") as f:
        json.dump(table, f, indent=1)
    return table


def _parse_args(argv):
    ap = argparse.ArgumentParser(description="Interleaved ONNX Runtime latency benchmark.")
    ap.add_argument("models", nargs="*", help="ONNX files; speedups are relative to the first")
    ap.add_argument("--table", metavar="LAYERS_JSON", help="instead of models, time each conv layer a JSON "
                    "description lists, alone, and write the latency table to --json")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--opt-level", default="all", choices=list(OPT_LEVELS), help="graph optimisation level")
    ap.add_argument("--json", dest="json_path", help="write results to this JSON file")
    ap.add_argument("--progress", action="store_true", help="show a progress bar (needs tqdm)")
    return ap.parse_args(argv)


def _table(rows: list[dict]) -> str:
    head = f"{'model':<32} {'MB':>8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>10} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(
            f"{os.path.basename(r['model']):<32} {r['size_bytes'] / 2**20:>8.2f} "
            f"{lat['p50']:>9.3f} {lat['p90']:>9.3f} {lat['p99']:>9.3f} "
            f"{r['throughput_img_s']:>10.1f} {r['speedup_vs_first']:>7.2f}x"
        )
    return "\n".join(lines)


def _table_mode(args, config: SessionConfig) -> int:
    if args.models or not args.json_path:
        print("ortbench: error: --table takes no ONNX files and needs --json OUT", file=sys.stderr)
        return 2
    try:
        table = build_table_file(args.table, args.json_path, args.batch, config, args.warmup, args.iters)
    except (OSError, ValueError) as err:
        print(f"ortbench: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(table['entries']) - 1} layers timed, table written to {args.json_path}")
    return 0


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        config = SessionConfig(threads=args.threads, provider=args.provider, opt_level=args.opt_level)
    except ValueError as err:
        print(f"ortbench: error: {err}", file=sys.stderr)
        return 2
    if args.table:
        return _table_mode(args, config)
    if not args.models:
        print("ortbench: error: give ONNX files, or --table LAYERS_JSON --json OUT", file=sys.stderr)
        return 2
    for path in args.models:
        if not os.path.isfile(path):
            print(f"ortbench: error: no such file: {path}", file=sys.stderr)
            return 2
    stats = time_sessions(args.models, batch=args.batch, config=config, warmup=args.warmup, iters=args.iters,
                          progress=args.progress)
    base = stats[0].p50
    results = [
        {
            "model": path,
            "size_bytes": os.path.getsize(path),
            "latency_ms": {k: getattr(s, k) for k in ("p50", "p90", "p99", "mean", "std")},
            "throughput_img_s": s.throughput,
            "speedup_vs_first": base / s.p50,
        }
        for path, s in zip(args.models, stats)
    ]
    settings = {
        "batch": args.batch,
        "threads": args.threads,
        "warmup": args.warmup,
        "iters": args.iters,
        "session": config.for_timing(len(args.models)).describe(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(_table(results))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"settings": settings, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
