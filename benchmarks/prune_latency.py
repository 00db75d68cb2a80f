#!/usr/bin/env python
"""Does the MACs cut of pruning turn into ONNX Runtime latency? Aligned vs unaligned widths.

Prunes ResNet-56 (by default) by a global percent plan to at least 2× fewer MACs (the smallest
percent that gets there), once per width alignment (--round-to: free widths, and multiples of the
SIMD block, 16 with AVX-512), exports dense and pruned to ONNX and times them interleaved in
onnxruntime at batch 1 / 1 thread and batch 64 / all cores. Prints, per setting, the latency speedup
over dense and its ratio to the MACs cut (1.0 = the MACs saving fully realised); --profile adds each
block's share of kernel time, which shows where the saving is lost. Channel scores come from a
run's dense.pt (--run DIR), or without one from a seeded random γ spread. Also times building the
dependency graph and pruning ResNet-164.

    tools/venv python tools/compress.py benchmarks/resnet56_sparse.yaml --out runs/resnet56_sparse
    tools/venv python benchmarks/prune_latency.py --run runs/resnet56_sparse [--profile] [--iters 100]
"""

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path

import torch

import slimdeploy as sd
from slimdeploy import ortbench
from slimdeploy.bench import count_macs
from slimdeploy.bn import affine_bns
from slimdeploy.export import export_onnx
from slimdeploy.models import build_model
from slimdeploy.plan import simd_block

SHAPE = (3, 32, 32)


def dense_model(name, run):
    torch.manual_seed(0)
    model = build_model(name, 10)
    if run:
        model.load_state_dict(torch.load(Path(run) / "dense.pt", weights_only=True, map_location="cpu"))
    else:  # γ spread over magnitudes, as after sparse training
        for m in affine_bns(model).values():
            m.weight.data = torch.rand(m.num_features) ** 4
    return model.eval()


def pruned_model(dense, name, percent, round_to, score_reduce="max"):
    """A copy of ``dense`` pruned by |γ|, without compensation: the latency of the channel surgery alone."""
    model, _ = sd.prune(dense, torch.randn(1, *SHAPE), how="percent", amount=percent, round_to=round_to,
                        compensate="none", score_reduce=score_reduce, model_name=name)
    return model


def kernel_time_by_block(path, batch, threads, runs=20) -> dict[str, float]:
    """Share of onnxruntime kernel time per top-level module (node names like /layer1/layer1.0/conv1/Conv)."""
    events = ortbench.profile_events(path, batch, ortbench.SessionConfig(threads=threads), runs)
    times = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            # nodes the optimizer adds (layout reorders) carry no module path: name them by op
            block = name.split("/")[1].split(".")[0] if name.startswith("/") and "/" in name[1:] else e["args"]["op_name"]
            times[block] += e["dur"]
    total = sum(times.values())
    return {block: t / total for block, t in sorted(times.items())} | {"total_ms": total / runs / 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--run", help="run directory whose dense.pt gives the scores")
    ap.add_argument("--percent", type=float, default=0.3, help="smallest global percent tried")
    ap.add_argument("--target", type=float, default=2.0, help="MACs cut to reach")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--profile", action="store_true",
                    help="also print each top-level block's share of ORT kernel time, dense and pruned")
    ap.add_argument("--round-to", nargs="+", default=["none", "auto"],
                    help="width alignments to compare: none, auto or a number")
    ap.add_argument("--score-reduce", nargs="+", default=["max"], choices=["max", "mean", "sum"],
                    help="how coupled BNs' scores combine (one variant per value)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())

    dense = dense_model(args.model, args.run)
    dense_macs = count_macs(dense, SHAPE)
    variants = {}
    for reduce in args.score_reduce:
        for r in args.round_to:
            round_to = None if r == "none" else r if r == "auto" else int(r)
            label = "unaligned" if round_to is None else f"round_to {simd_block() if r == 'auto' else r}"
            variants[label if len(args.score_reduce) == 1 else f"{label}, {reduce}"] = (round_to, reduce)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [export_onnx(dense, Path(tmp) / "dense.onnx", SHAPE)]
        cuts = {}
        print(f"{args.model}, scores from {args.run or 'random γ'}; dense {dense_macs / 1e6:.1f} M MACs (thop); "
              f"smallest percent (step 0.05) reaching a {args.target}× MACs cut:")
        for label, (round_to, reduce) in variants.items():
            percent = args.percent
            while True:
                model = pruned_model(dense, args.model, percent, round_to, reduce)
                cuts[label] = dense_macs / count_macs(model, SHAPE)
                if cuts[label] >= args.target or percent >= 0.9:
                    break
                percent = round(percent + 0.05, 2)
            paths.append(export_onnx(model, Path(tmp) / f"variant{len(paths)}.onnx", SHAPE))
            print(f"  {label:<22} percent {percent:.2f}: MACs cut {cuts[label]:.2f}×")
        print(f"{'setting':<22}{'variant':<24}{'dense p50 ms':>13}{'pruned p50 ms':>15}{'speedup':>9}{'÷ MACs cut':>12}")
        for batch, threads in ((1, 1), (64, os.cpu_count())):
            stats = ortbench.time_sessions(paths, batch=batch, config=ortbench.SessionConfig(threads=threads),
                                           warmup=args.warmup, iters=args.iters)
            for (label, cut), s in zip(cuts.items(), stats[1:]):
                speedup = stats[0].p50 / s.p50
                print(f"{f'batch {batch}, {threads} thr':<22}{label:<24}{stats[0].p50:>13.3f}{s.p50:>15.3f}"
                      f"{speedup:>8.2f}×{speedup / cut:>12.2f}")
            if args.profile:
                for label, path in zip(["dense", *cuts], paths):
                    shares = kernel_time_by_block(path, batch, threads)
                    total = shares.pop("total_ms")
                    print(f"    kernel time {total:8.2f} ms, {label:<22}"
                          + "  ".join(f"{b} {100 * v:.0f}%" for b, v in shares.items() if v >= 0.02))

    big = dense_model("resnet164", None)
    t0 = time.perf_counter()
    pruned_model(big, "resnet164", 0.5, None)
    print(f"resnet164: dependency graph + plan + pruning in {time.perf_counter() - t0:.2f} s "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
