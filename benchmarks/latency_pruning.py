#!/usr/bin/env python
"""Percent pruning against latency-budget pruning (HALP-style), ResNet-56 at 32 px.

For each target speedup (1.5× and 2.0× by default), a latency plan (`how="latency"`) is made and,
beside it, the percent plan with the same number of kept channels. Both are exported and timed
interleaved with the dense model in onnxruntime at batch 1 / 1 thread. Prints per plan: measured
speedup, MACs cut, their ratio (1.0: the MACs saving fully realised) and the kept channel score
(sum of |γ| kept, as a share of the dense model's). Channel scores come from a run's dense.pt
(--run DIR), or without one from a seeded random γ spread.

    tools/venv python benchmarks/latency_pruning.py [--run runs/resnet56_sparse] [--iters 300]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import slimdeploy as sd
from slimdeploy import ortbench
from slimdeploy.bench import count_macs
from slimdeploy.errors import InputError
from slimdeploy.export import export_onnx
from slimdeploy.models import build_model
from prune_latency import dense_model  # this folder is on sys.path when run as a script

SHAPE = (3, 32, 32)


def kept_score(dense, plan) -> float:
    """Share of the dense model's total |γ| that the plan keeps."""
    bns = dict(dense.named_modules())
    total = kept = 0.0
    for group in plan.groups:
        removed = set(group.remove)
        for name in group.bns:
            gamma = bns[name].weight.detach().abs()
            total += float(gamma.sum())
            kept += float(sum(g for c, g in enumerate(gamma) if c not in removed))
    return kept / total


def measure(dense, pruned, plan, iters, tmp):
    paths = [export_onnx(m, Path(tmp) / f"{n}.onnx", SHAPE) for n, m in (("dense", dense), ("pruned", pruned))]
    d, p = ortbench.time_sessions([str(x) for x in paths], batch=1, config=ortbench.SessionConfig(threads=1),
                                  warmup=iters // 10, iters=iters)
    macs_cut = count_macs(dense, SHAPE) / count_macs(pruned, SHAPE)
    speedup = d.p50 / p.p50
    return {"speedup": speedup, "macs_cut": macs_cut, "ratio": speedup / macs_cut,
            "kept_score": kept_score(dense, plan), "channels": f"{plan.channels_kept}/{plan.channels_total}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--run", help="run directory whose dense.pt gives the γ scores")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    dense = dense_model(args.model, args.run)
    x = torch.randn(64, *SHAPE)
    print(f"{args.model}, batch 1 / 1 thread, round_to {round_to}")
    print(f"{'plan':<22} {'channels':>10} {'speedup':>8} {'MACs cut':>9} {'ratio':>6} {'kept score':>10}")
    for target in args.targets:
        try:
            pruned, plan = sd.prune(dense, x, how="latency", target_speedup=target, round_to=round_to)
        except InputError as err:  # a target past the smallest widths: say what they reach, go on
            print(f"latency {target}x: {err}")
            continue
        rounds = plan.notes["latency"]["rounds"]
        share = 1 - plan.channels_kept / plan.channels_total
        baseline, baseline_plan = sd.prune(dense, x, how="percent", amount=share, round_to=round_to)
        with tempfile.TemporaryDirectory() as tmp:
            rows = [(f"latency {target}x", measure(dense, pruned, plan, args.iters, tmp)),
                    (f"percent {share:.0%}", measure(dense, baseline, baseline_plan, args.iters, tmp))]
        for name, r in rows:
            print(f"{name:<22} {r['channels']:>10} {r['speedup']:>7.2f}x {r['macs_cut']:>8.2f}x "
                  f"{r['ratio']:>6.2f} {r['kept_score']:>9.1%}")
        print(f"  (latency plan: {len(rounds)} rounds, its own final measurement "
              f"{plan.notes['latency']['chosen']['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
