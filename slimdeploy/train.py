"""Training loop: SGD with a per-step learning-rate schedule, a sparsifier hook, evaluation and
atomic, resumable checkpoints."""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from slimdeploy.data import Dataset, Normalize, Split, eval_batches, steps_per_epoch, train_batches
from slimdeploy.errors import SlimdeployError
from slimdeploy.outputs import main_logits
from slimdeploy.sparsity import Sparsifier


class TrainingDiverged(SlimdeployError, RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(SlimdeployError, RuntimeError):
    """A checkpoint file cannot be read."""


@dataclass
class TrainResult:
    epochs: int
    seconds: float
    accuracy: float | None
    history: list[dict] = field(default_factory=list)
    precision: str = "fp32"  # what the training steps ran in (see resolve_precision)


def lr_factor(cfg, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` ∈ [0, 1) of the run."""
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "onecycle":  # linear warm-up over 15 %, then cosine to zero
        warm = 0.15
        if progress < warm:
            return 0.1 + 0.9 * progress / warm
        return 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm)))
    return 1.0


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 units that compute bf16 faster than fp32
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo where there is one, and torch's own detection."""
    flags = {name for name, present in torch.cpu.get_capabilities().items() if present is True}
    try:
        text = CPUINFO.read_text()
    except OSError:
        return flags
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return flags | set(line.partition(":")[2].split())


def resolve_precision(precision: str, device_type: str) -> str:
    """What ``train.precision`` means on this device: fp32, bf16 (autocast) or fp16 (autocast, loss scaling).

    auto is bf16 on CPUs with native bf16 units, fp16 on CUDA, fp32 otherwise. fp16 needs CUDA: on
    other devices it falls back to fp32, with a warning, as ``amp: true`` always did.
    """
    if precision == "auto":
        if device_type == "cuda":
            return "fp16"
        native_bf16 = device_type == "cpu" and not cpu_flags().isdisjoint(NATIVE_BF16_FLAGS)
        return "bf16" if native_bf16 else "fp32"
    if precision == "fp16" and device_type != "cuda":
        warnings.warn(f"precision fp16 needs CUDA; training on {device_type} in fp32 (bf16 is the CPU's "
                      f"half precision)", stacklevel=2)
        return "fp32"
    return precision


def autocast(device_type: str, precision: str):
    """The forward pass's context: autocast to bf16/fp16; parameters and optimizer state stay fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def use_channels_last(setting: bool | str, device_type: str, precision: str) -> bool:
    """``data.channels_last`` resolved: auto is on, except on CUDA in fp32, where NHWC rarely pays."""
    if setting != "auto":
        return bool(setting)
    return device_type != "cuda" or resolve_precision(precision, device_type) != "fp32"


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, normalize: Normalize, batch_size: int, progress: bool = False) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = 0
    batches = eval_batches(split, batch_size)
    for images, labels in tqdm(batches, desc="eval", total=math.ceil(len(split) / batch_size), disable=not progress, leave=False):
        logits = model(normalize(images))
        correct += int((logits.argmax(1).cpu() == labels).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(split), 1)


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None


def _rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train(
    model: nn.Module,
    data: Dataset,
    cfg,
    *,
    batch_size: int,
    eval_batch_size: int,
    augment: bool,
    normalize: Normalize,
    sparsifier: Sparsifier,
    seed: int,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    rank: int = 0,
    world: int = 1,
    fingerprint: str = "",
) -> TrainResult:
    """Train ``model`` (plain or DDP-wrapped) for ``cfg.epochs`` epochs.

    The full state goes to ``checkpoint`` at the end of every epoch and every ``cfg.checkpoint_steps``
    steps (rank 0 writes it); with ``resume`` training continues from it, mid-epoch included, and ends
    with the weights an uninterrupted run would have. ``fingerprint`` names what the run depends on; a
    checkpoint written under another one is refused.
    """
    inner = unwrap(model)
    optimizer = make_optimizer(inner, cfg)
    sparsifier.attach(optimizer)
    batch_size = min(batch_size, len(data.train) // world)
    per_epoch = steps_per_epoch(data.train, batch_size, world)
    total_steps = max(cfg.epochs * per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step / total_steps))
    device_type = torch.device(normalize.device).type
    precision = resolve_precision(cfg.precision, device_type)
    # only fp16 needs loss scaling: bf16 has float32's exponent range
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    epoch, start_step, seconds, history = 0, 0, 0.0, []
    loss_sum, seen = torch.zeros((), dtype=torch.float64), 0

    state = None
    if resume and checkpoint and rank == 0 and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)
    if world > 1:  # rank 0's checkpoint, whether or not the other ranks see the same folder
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{checkpoint}: written by a different recipe or plan; "
                                  f"use another --out, or run without --resume to start over")
        try:
            inner.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sparsifier.load_state_dict(state["sparsifier"])
            if state["scaler"]:  # empty when the run was written without loss scaling
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{checkpoint}: does not fit this model ({type(err).__name__})") from None
        _set_rng_state(state["rng"])
        epoch, start_step, seconds, history = state["epoch"], state["step"], state["seconds"], state["history"]
        loss_sum, seen = state["loss_sum"], state["seen"]

    def save(epoch: int, step: int) -> None:
        if checkpoint and rank == 0:
            save_atomic(
                {
                    "model": inner.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "sparsifier": sparsifier.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "epoch": epoch,  # epochs finished
                    "step": step,  # steps finished in the current epoch
                    "loss_sum": loss_sum,
                    "seen": seen,
                    "seconds": seconds,
                    "history": history,
                    "fingerprint": fingerprint,
                },
                checkpoint,
            )

    accuracy = history[-1]["test_acc"] if history else None
    while epoch < cfg.epochs:
        model.train()
        tic = time.perf_counter()
        batches = train_batches(data.train, batch_size, seed, epoch, augment, start_step, rank, world)
        bar = tqdm(batches, total=per_epoch, initial=start_step, desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        for step, (images, labels) in enumerate(bar, start=start_step):
            labels = labels.to(normalize.device, non_blocking=True)
            with autocast(device_type, precision):
                loss = F.cross_entropy(main_logits(model(normalize(images))), labels)
            finite = torch.isfinite(loss.detach())
            if world > 1:  # every rank stops together, none is left waiting in an allreduce
                finite = finite.to(torch.uint8)
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite:
                raise TrainingDiverged(
                    f"{desc}: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"the last good checkpoint is kept ({checkpoint})"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # The sparsifier's hooks run inside optimizer.step(): after the scaler unscaled the gradients,
            # and not at all when the scaler skips the step for inf/NaN gradients.
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach().double().cpu() * len(labels)
            seen += len(labels)
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
            if cfg.checkpoint_steps and (step + 1) % cfg.checkpoint_steps == 0 and step + 1 < per_epoch:
                seconds += time.perf_counter() - tic
                tic = time.perf_counter()
                save(epoch, step + 1)
        seconds += time.perf_counter() - tic
        accuracy = evaluate(model, data.test, normalize, eval_batch_size, progress)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(loss_sum) / max(seen, 1),
                "test_acc": accuracy,
                "penalty": sparsifier.penalty_value(),
                "lr": optimizer.param_groups[0]["lr"],
                "precision": precision,
            }
        )
        if progress:
            tqdm.write(
                f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['train_loss']:.4f}, "
                f"test acc {accuracy:.2f}%, penalty {history[-1]['penalty']:.4g}"
            )
        epoch, start_step = epoch + 1, 0
        loss_sum, seen = torch.zeros((), dtype=torch.float64), 0
        save(epoch, 0)
    if accuracy is None:
        accuracy = evaluate(model, data.test, normalize, eval_batch_size)
    return TrainResult(cfg.epochs, seconds, accuracy, history, precision)
