"""ONNX Runtime latency benchmark; needs only numpy and onnxruntime.

Self-contained so it can be copied to an edge device and run as a script:

    python ortbench.py dense.onnx pruned.onnx --batch 1 --threads 1 --json out.json

Models are timed interleaved (A B A B ...) so that drift of the machine (thermal
throttling, background load) affects every model alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

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


def _session_options(threads: int, spinning: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def make_session(path, threads: int, provider: str = "CPUExecutionProvider",
                 spinning: bool = True) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), _session_options(threads, spinning), providers=[provider])


def spinning_for(n_models: int) -> bool:
    """Whether timed sessions keep onnxruntime's default spin-waiting pool threads.

    Timed interleaved, the idle sessions' pool threads spin and steal the cores of the one that
    runs: ResNet-56 at batch 64 on 2 threads took 123 ms interleaved with spinning, 80 ms alone
    and 80 ms interleaved without it. So only a model timed alone keeps the default.
    """
    return n_models == 1


def session_options_dict(threads: int, provider: str = "CPUExecutionProvider", spinning: bool = True) -> dict:
    """The session settings used by make_session, for reports."""
    return {
        "provider": provider,
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
        "intra_op_spinning": spinning,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "onnxruntime": ort.__version__,
    }


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


def time_sessions(
    paths: list,
    batch: int = 1,
    threads: int = 1,
    warmup: int = 20,
    iters: int = 200,
    provider: str = "CPUExecutionProvider",
    progress: bool = False,
) -> list[LatencyStats]:
    """Time each model `iters` times, interleaved, after `warmup` discarded rounds."""
    sessions = [make_session(p, threads, provider, spinning_for(len(paths))) for p in paths]
    rng = np.random.default_rng(0)
    inputs: dict[tuple, np.ndarray] = {}  # models with equal input shapes get the same array
    feeds = []
    for sess in sessions:
        shape = input_shape_for(sess, batch)
        if shape not in inputs:
            inputs[shape] = rng.standard_normal(shape, dtype=np.float32)
        feeds.append({sess.get_inputs()[0].name: inputs[shape]})
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
    return [latency_stats(s, batch, threads) for s in samples]


def _parse_args(argv):
    ap = argparse.ArgumentParser(description="Interleaved ONNX Runtime latency benchmark.")
    ap.add_argument("models", nargs="+", help="ONNX files; speedups are relative to the first")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--provider", default="CPUExecutionProvider")
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


def main(argv=None) -> int:
    args = _parse_args(argv)
    for path in args.models:
        if not os.path.isfile(path):
            print(f"ortbench: error: no such file: {path}", file=sys.stderr)
            return 2
    stats = time_sessions(
        args.models, batch=args.batch, threads=args.threads, warmup=args.warmup,
        iters=args.iters, provider=args.provider, progress=args.progress,
    )
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
        "session": session_options_dict(args.threads, args.provider, spinning_for(len(args.models))),
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
