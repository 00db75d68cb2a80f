#!/usr/bin/env python
"""Per-step cost of each sparsifier against the same training step with no penalty.

ResNet-56, batch 128, CPU by default. The variants are timed interleaved (one step of each per round)
so machine drift hits all alike; the script prints the median step time, the median of the per-round
ratios to the no-penalty step, and the median time of the sparsifier hooks alone (the overhead itself,
free of the step-to-step noise of a whole training step).

    tools/venv python benchmarks/sparsity_overhead.py [--model resnet56] [--batch 128] [--rounds 10]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from slimdeploy.models import build_model
from slimdeploy.sparsity import make_sparsifier

VARIANTS = {
    "none": dict(method="none"),
    "subgradient l1": dict(method="subgradient", penalty="l1", lam=1e-4),
    "subgradient lp 1/2": dict(method="subgradient", penalty="lp", lam=1e-4, p=0.5),
    "subgradient tl1": dict(method="subgradient", penalty="tl1", lam=1e-4, a=1.0),
    "subgradient mcp": dict(method="subgradient", penalty="mcp", lam=1e-4, a=3.0),
    "subgradient scad": dict(method="subgradient", penalty="scad", lam=1e-4, a=3.7),
    "proximal l1": dict(method="proximal", penalty="l1", lam=0.002, beta=0.25),
    "proximal lp 3/4": dict(method="proximal", penalty="lp", lam=0.002, p=0.75, beta=0.25),
    "proximal scad": dict(method="proximal", penalty="scad", lam=0.002, a=3.7, beta=0.25),
    "prox_sgd tl1": dict(method="prox_sgd", penalty="tl1", lam=1e-4, a=1.0),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.model, 10, bn_init=0.5).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sparsifiers = {name: make_sparsifier(model, **cfg) for name, cfg in VARIANTS.items()}
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step_ms = {n: [] for n in VARIANTS}
    hook_ms = {n: [] for n in VARIANTS}

    for r in range(-args.warmup, args.rounds):
        names = list(sparsifiers)
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no variant always first
            sp = sparsifiers[name]
            sync()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync()
            h0 = time.perf_counter()
            sp.before_step()
            sync()
            h1 = time.perf_counter()
            optimizer.step()
            sync()
            h2 = time.perf_counter()
            sp.after_step(0.1)
            sync()
            t1 = time.perf_counter()
            if r >= 0:
                step_ms[name].append(1e3 * (t1 - t0))
                hook_ms[name].append(1e3 * ((h1 - h0) + (t1 - h2)))

    base = statistics.median(step_ms["none"])
    print(f"{args.model}, batch {args.batch}, {device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds; BN channels regularised: {sum(sparsifiers['none'].sizes)}")
    print(f"{'sparsifier':<22}{'step p50 (ms)':>15}{'ratio':>9}{'hooks p50 (ms)':>16}{'hooks / step':>14}")
    for name in VARIANTS:
        med = statistics.median(step_ms[name])
        # paired per round, so drift between rounds cancels
        ratio = statistics.median(a / b for a, b in zip(step_ms[name], step_ms["none"]))
        hooks = statistics.median(hook_ms[name])
        print(f"{name:<22}{med:>15.1f}{ratio:>9.3f}{hooks:>16.3f}{hooks / base:>14.4f}")


if __name__ == "__main__":
    main()
