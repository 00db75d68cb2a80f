#!/usr/bin/env python
"""Trainer throughput (images/s) against a bare PyTorch loop, same model, batch and memory format.

The trainer (slimdeploy.train.train: uint8 batches, per-image crop/flip and normalisation in torch,
sparsifier hooks, LR schedule) and a bare loop over pre-made float batches (forward, backward, SGD
step, nothing else) alternate epoch by epoch on the same synthetic CIFAR-sized data; the script
prints the median images/s of each and their ratio.

    tools/venv python benchmarks/train_throughput.py [--models resnet56 vgg19] [--batch 128] [--steps 6]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdeploy.data import Normalize, make_synthetic  # noqa: E402
from slimdeploy.models import build_model  # noqa: E402
from slimdeploy.recipe import SparsityCfg, TrainCfg  # noqa: E402
from slimdeploy.sparsity import make_sparsifier  # noqa: E402
from slimdeploy.train import train  # noqa: E402


def bare_epoch(model, optimizer, batches, memory_format) -> float:
    tic = time.perf_counter()
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - tic


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg19"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="steps per timed epoch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    data = make_synthetic(train_size=args.batch * args.steps, test_size=16, seed=0)
    norm = Normalize(data.mean, data.std, "cpu", args.channels_last)
    images = args.batch * args.steps
    print(f"batch {args.batch}, {args.steps} steps an epoch, {torch.get_num_threads()} threads, "
          f"{'channels_last' if args.channels_last else 'contiguous'}; median of {args.rounds} rounds")
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, 10).to(memory_format=memory_format)
        bare_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        batches = [(norm(data.train.images[i:i + args.batch]), data.train.labels[i:i + args.batch])
                   for i in range(0, images, args.batch)]
        sparsifier = make_sparsifier(model, SparsityCfg(method="subgradient", penalty="l1", lam=1e-5))
        cfg = TrainCfg(epochs=1, lr=0.01, schedule="constant")
        bare, ours = [], []
        bare_epoch(model, bare_opt, batches[:1], memory_format)  # warm-up
        for r in range(args.rounds):
            bare.append(images / bare_epoch(model, bare_opt, batches, memory_format))
            res = train(model, data, cfg, batch_size=args.batch, eval_batch_size=16, augment=True,
                        normalize=norm, sparsifier=sparsifier, seed=r, progress=False)
            ours.append(images / res.seconds)
        b, o = statistics.median(bare), statistics.median(ours)
        print(f"{name:<10} bare loop {b:8.1f} img/s   trainer {o:8.1f} img/s   ratio {o / b:.3f}")


if __name__ == "__main__":
    main()
