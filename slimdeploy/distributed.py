"""Several processes, one run: DistributedDataParallel set up from torchrun's environment.

`torchrun --nproc_per_node=N tools/compress.py RECIPE` starts N processes; each trains on its shard of
every batch (gloo on CPU, nccl on GPU), the sparsifier acts on the synchronised γ so every rank makes
the same update, and only rank 0 writes files, exports and benchmarks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[Processes, torch.device]:
    """The process layout and this process's device (``device`` as in the recipe: auto, cpu, cuda)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise RuntimeError("device: cuda was asked for, but no CUDA device is available")
    if world <= 1:
        return Processes(), torch.device("cuda" if use_cuda else "cpu")
    procs = Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(procs.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return procs, torch.device("cuda", procs.local_rank) if use_cuda else torch.device("cpu")


def wrap(model: nn.Module, procs: Processes, device: torch.device) -> nn.Module:
    """The model as DDP when there are several processes (gradients averaged in backward)."""
    if procs.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first(procs: Processes):
    """Rank 0 runs the block (e.g. a download) before the other ranks do."""
    if not procs.main:
        barrier()
    yield
    if procs.main:
        barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
