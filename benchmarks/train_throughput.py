#!/usr/bin/env python
"""Trainer throughput (images/s) against the fastest bare PyTorch loop on this machine, same model and batch.

The trainer (slimdeploy.train.train with the recipe defaults precision: auto and channels_last: auto;
uint8 batches, per-image crop/flip and normalisation in torch, sparsifier hooks, LR schedule) and bare
loops over pre-made float batches (forward, backward, SGD step, nothing else) in fp32, fp32
channels_last and bf16 autocast + channels_last alternate epoch by epoch on the same synthetic
CIFAR-sized data, after a one-step warm-up of each. The script prints the median images/s of each and
the trainer's ratio to the fastest bare loop.

    tools/venv python benchmarks/train_throughput.py [--models resnet20 resnet56] [--batch 128] [--steps 6]
"""

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from slimdeploy.data import Normalize, Split, make_synthetic
from slimdeploy.models import build_model
from slimdeploy.recipe import TrainCfg
from slimdeploy.sparsity import make_sparsifier
from slimdeploy.train import LoopSettings, autocast, resolve_precision, train, use_channels_last

BARE_LOOPS = {"fp32": ("fp32", False), "fp32 channels_last": ("fp32", True), "bf16 channels_last": ("bf16", True)}


def bare_epoch(model, optimizer, batches, precision) -> float:
    tic = time.perf_counter()
    model.train()
    for x, y in batches:
        with autocast("cpu", precision):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - tic


def bare_loop(name, data, batch, precision, channels_last):
    """A fresh model, its SGD and the epoch's normalised batches, all in the loop's memory format."""
    torch.manual_seed(0)
    norm = Normalize(data.mean, data.std, "cpu", channels_last)
    model = build_model(name, 10).to(memory_format=norm.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images, labels = data.train.images, data.train.labels
    batches = [(norm(images[i:i + batch]), labels[i:i + batch]) for i in range(0, len(labels), batch)]
    return model, optimizer, batches, precision


def trainer_epoch(model, data, batch, norm, sparsifier, seed) -> float:
    cfg = TrainCfg(epochs=1, lr=0.01, schedule="constant")  # precision: auto
    loop = LoopSettings(batch_size=batch, eval_batch_size=16, augment=True, seed=seed)
    return train(model, data, cfg, loop, normalize=norm, sparsifier=sparsifier, progress=False).seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="steps per timed epoch")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data = make_synthetic(train_size=args.batch * args.steps, test_size=16, seed=0)
    one_batch = dataclasses.replace(data, train=Split(data.train.images[:args.batch], data.train.labels[:args.batch]))
    images = args.batch * args.steps
    channels_last = use_channels_last("auto", "cpu", "auto")
    norm = Normalize(data.mean, data.std, "cpu", channels_last)
    print(f"batch {args.batch}, {args.steps} steps an epoch, {torch.get_num_threads()} threads; trainer (auto): "
          f"{resolve_precision('auto', 'cpu')}{' channels_last' if channels_last else ''}; "
          f"median of {args.rounds} rounds")
    for name in args.models:
        loops = {label: bare_loop(name, data, args.batch, *setting) for label, setting in BARE_LOOPS.items()}
        torch.manual_seed(0)
        model = build_model(name, 10).to(memory_format=norm.memory_format)
        sparsifier = make_sparsifier(model, "subgradient", "l1", 1e-5)
        for bare_model, optimizer, batches, precision in loops.values():  # warm-up: one step each
            bare_epoch(bare_model, optimizer, batches[:1], precision)
        trainer_epoch(model, one_batch, args.batch, norm, sparsifier, seed=0)
        speeds = {label: [] for label in [*loops, "trainer"]}
        for r in range(args.rounds):
            for label, (bare_model, optimizer, batches, precision) in loops.items():
                speeds[label].append(images / bare_epoch(bare_model, optimizer, batches, precision))
            speeds["trainer"].append(images / trainer_epoch(model, data, args.batch, norm, sparsifier, seed=r))
        median = {label: statistics.median(values) for label, values in speeds.items()}
        fastest = max(loops, key=median.get)
        bare = ", ".join(f"{label} {median[label]:.1f}" for label in loops)
        print(f"{name:<10} bare loops (img/s): {bare}; trainer {median['trainer']:.1f}; "
              f"ratio to the fastest ({fastest}) {median['trainer'] / median[fastest]:.3f}")

if __name__ == "__main__":
    main()
