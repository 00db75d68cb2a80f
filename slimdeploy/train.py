"""Training loop: SGD with a per-step learning-rate schedule, a sparsifier hook, evaluation and
atomic, resumable checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from slimdeploy.accuracy import top1
from slimdeploy.bn import affine_bns
from slimdeploy.data import Dataset, Normalize, Split, steps_per_epoch, train_batches
from slimdeploy.errors import SlimdeployError
from slimdeploy.outputs import main_logits
from slimdeploy.registry import Registry
from slimdeploy.sparsity import Sparsifier


log = logging.getLogger(__name__)


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


# A schedule maps (the optimizer section, progress ∈ [0, 1) of the run) to the learning-rate multiplier.
SCHEDULES: Registry[Callable[[Any, float], float]] = Registry("schedule")


@SCHEDULES.register("multistep", description="× gamma at each of milestones")
def _multistep(cfg, progress: float) -> float:
    return cfg.gamma ** sum(progress >= m for m in cfg.milestones)


@SCHEDULES.register("cosine", description="cosine from lr to zero")
def _cosine(cfg, progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULES.register("onecycle", description="linear warm-up from lr/10 over 15 %, then cosine to zero")
def _onecycle(cfg, progress: float) -> float:
    warm = 0.15
    if progress < warm:
        return 0.1 + 0.9 * progress / warm
    return 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm)))


@SCHEDULES.register("constant", description="lr throughout")
def _constant(cfg, progress: float) -> float:
    return 1.0


def lr_factor(cfg, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` ∈ [0, 1) of the run, by ``cfg.schedule``."""
    return SCHEDULES.get(cfg.schedule)(cfg, progress)


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD with two param groups: every other parameter first, then the BN γ and β.

    The BN group learns at ``lr × bn_lr_scale`` (the sparsifier's step on γ reads that rate) with
    ``bn_weight_decay`` (None: ``weight_decay``): the penalty already acts on γ, so decay may be left out.
    """
    # fine-tuning's cfg has neither key: no penalty acts there
    bn_lr_scale, bn_weight_decay = getattr(cfg, "bn_lr_scale", 1.0), getattr(cfg, "bn_weight_decay", None)
    bn_ids = {id(p) for m in affine_bns(model).values() for p in m.parameters(recurse=False)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in bn_ids]},
        {"params": [p for p in model.parameters() if id(p) in bn_ids], "lr": cfg.lr * bn_lr_scale,
         "weight_decay": cfg.weight_decay if bn_weight_decay is None else bn_weight_decay},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


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


def evaluate(model: nn.Module, split: Split, normalize: Normalize, batch_size: int, progress: bool = False) -> float:
    """Top-1 accuracy in percent (see `slimdeploy.accuracy.top1`)."""
    return top1(model, split, normalize, batch_size, progress=progress)


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


@dataclass(frozen=True)
class LoopSettings:
    """How a training stage is fed, where it runs and which checkpoint is its own (the optimizer's settings
    are the stage's cfg)."""

    batch_size: int  # per process
    eval_batch_size: int
    augment: bool | str  # as data.augment
    seed: int = 0
    rank: int = 0
    world: int = 1
    fingerprint: str = ""  # what the run depends on: a checkpoint written under another one is refused
    device: torch.device | str = "cpu"  # the model's, where labels go; Normalize puts the images there

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


@dataclass
class EpochStats:
    """One epoch's numbers; with the test accuracy they make its entry in ``TrainResult.history``."""

    epoch: int  # counted from 1
    train_loss: float
    penalty: float
    lr: float  # of the first param group, at the epoch's end
    precision: str

    def record(self, test_acc: float) -> dict:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "test_acc": test_acc, "penalty": self.penalty,
                "lr": self.lr, "precision": self.precision}


@dataclass
class TrainState:
    """All a run needs to continue bit-exactly where it stopped; ``state_dict`` is a checkpoint's content."""

    model: nn.Module  # plain or DDP-wrapped; saved unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sparsifier: Sparsifier
    precision: str = "fp32"  # what the steps autocast to; the cfg and device decide it, so it is not saved
    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished in the current epoch
    seconds: float = 0.0  # training time, evaluation excluded
    history: list[dict] = field(default_factory=list)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    seen: int = 0  # images summed in loss_sum

    @classmethod
    def create(cls, model: nn.Module, cfg, sparsifier: Sparsifier, total_steps: int, device_type: str) -> TrainState:
        """A fresh state: SGD with the sparsifier attached, the lr schedule over ``total_steps``, fp16 loss scaling."""
        optimizer = make_optimizer(unwrap(model), cfg)
        sparsifier.attach(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step / total_steps))
        precision = resolve_precision(cfg.precision, device_type)
        # only fp16 needs loss scaling: bf16 has float32's exponent range
        scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
        return cls(model, optimizer, scheduler, scaler, sparsifier, precision)

    def state_dict(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sparsifier": self.sparsifier.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "loss_sum": self.loss_sum,
            "seen": self.seen,
            "seconds": self.seconds,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sparsifier.load_state_dict(state["sparsifier"])
        if state["scaler"]:  # empty when the run was written without loss scaling
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.epoch, self.step, self.seconds = state["epoch"], state["step"], state["seconds"]
        self.history, self.loss_sum, self.seen = state["history"], state["loss_sum"], state["seen"]

    def finish_epoch(self) -> None:
        self.epoch, self.step = self.epoch + 1, 0
        self.loss_sum, self.seen = torch.zeros((), dtype=torch.float64), 0


class CheckpointManager:
    """A training stage's checkpoint file: rank 0 writes it atomically, every rank resumes from rank 0's copy.

    A checkpoint written under another ``fingerprint`` is refused. With ``path`` None nothing is read or written.
    """

    def __init__(self, path: str | Path | None, fingerprint: str = "", rank: int = 0, world: int = 1):
        self.path = Path(path) if path else None
        self.fingerprint, self.rank, self.world = fingerprint, rank, world

    def load_or_none(self) -> dict | None:
        """The checkpoint's content on every rank, or None where rank 0 has none."""
        if self.path is None:
            return None
        state = load_checkpoint(self.path) if self.rank == 0 and self.path.is_file() else None
        if self.world > 1:  # rank 0's checkpoint, whether or not the other ranks see the same folder
            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if state is not None and state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self.path}: written by a different recipe or plan; "
                                  f"use another --out, or run without --resume to start over")
        return state

    def restore(self, state: TrainState) -> bool:
        """Load the checkpoint into ``state``; False where there is none."""
        saved = self.load_or_none()
        if saved is None:
            return False
        try:
            state.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{self.path}: does not fit this model ({type(err).__name__})") from None
        return True

    def save(self, state: TrainState) -> None:
        if self.path is not None and self.rank == 0:
            save_atomic({**state.state_dict(), "fingerprint": self.fingerprint}, self.path)


def _finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite in every process: all stop together, none is left waiting in an allreduce."""
    finite = torch.isfinite(loss.detach())
    if world > 1:
        finite = finite.to(torch.uint8)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _training_step(state: TrainState, images: torch.Tensor, labels: torch.Tensor, loop: LoopSettings) -> torch.Tensor:
    """One optimizer step on a normalised batch; returns the batch's loss (before the update)."""
    with autocast(loop.device_type, state.precision):
        loss = F.cross_entropy(main_logits(state.model(images)), labels)
    if not _finite_everywhere(loss, loop.world):
        raise TrainingDiverged(f"loss is {loss.item()} at epoch {state.epoch + 1}, step {state.step + 1}")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    # The sparsifier's hooks run inside optimizer.step(): after the scaler unscaled the gradients,
    # and not at all when the scaler skips the step for inf/NaN gradients.
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.loss_sum += loss.detach().double().cpu() * len(labels)
    state.seen += len(labels)
    state.step += 1
    return loss


def train_one_epoch(state: TrainState, batches, loop: LoopSettings, after_step=None) -> EpochStats:
    """Train on ``batches`` (normalised images, labels on ``loop.device``): the rest of epoch ``state.epoch``.

    ``after_step(state, loss)`` runs after every step, with ``state.step`` counting it (progress display,
    mid-epoch checkpoints). Raises TrainingDiverged when the loss is not finite.
    """
    state.model.train()
    tic = time.perf_counter()
    for images, labels in batches:
        loss = _training_step(state, images, labels, loop)
        now = time.perf_counter()
        state.seconds, tic = state.seconds + now - tic, now  # a checkpoint written in after_step has it
        if after_step:
            after_step(state, loss)
    state.seconds += time.perf_counter() - tic
    return EpochStats(state.epoch + 1, float(state.loss_sum) / max(state.seen, 1), state.sparsifier.penalty_value(),
                      state.optimizer.param_groups[0]["lr"], state.precision)


def _after_step(bar: tqdm, checkpoints: CheckpointManager, every: int, per_epoch: int):
    """Progress every 20 steps, and a checkpoint every ``every`` steps within the epoch (its end writes one anyway)."""
    def after_step(state: TrainState, loss: torch.Tensor) -> None:
        if not bar.disable and (state.step - 1) % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{state.optimizer.param_groups[0]['lr']:.3g}")
        if every and state.step % every == 0 and state.step < per_epoch:
            checkpoints.save(state)
    return after_step


def train(model: nn.Module, data: Dataset, cfg, loop: LoopSettings | None = None, *, normalize: Normalize,
          sparsifier: Sparsifier, checkpoint: str | Path | None = None, resume: bool = False, progress: bool = True,
          desc: str = "train", **loop_fields) -> TrainResult:
    """Train ``model`` (plain or DDP-wrapped) for ``cfg.epochs`` epochs, as ``loop`` says (or its fields, as keywords).

    The full state goes to ``checkpoint`` at the end of every epoch and every ``cfg.checkpoint_steps`` steps (rank 0
    writes it); with ``resume`` training continues from it, mid-epoch included, and ends with the weights an
    uninterrupted run would have.
    """
    loop = LoopSettings(**loop_fields) if loop is None else replace(loop, **loop_fields)
    batch_size = min(loop.batch_size, len(data.train) // loop.world)
    per_epoch = steps_per_epoch(data.train, batch_size, loop.world)
    state = TrainState.create(model, cfg, sparsifier, max(cfg.epochs * per_epoch, 1), loop.device_type)
    checkpoints = CheckpointManager(checkpoint, loop.fingerprint, loop.rank, loop.world)
    if resume:
        checkpoints.restore(state)
    accuracy = state.history[-1]["test_acc"] if state.history else None
    while state.epoch < cfg.epochs:
        bar = tqdm(train_batches(data.train, batch_size, loop.seed, state.epoch, loop.augment, state.step, loop.rank,
                                 loop.world), total=per_epoch, initial=state.step,
                   desc=f"{desc} {state.epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        batches = ((normalize(images), labels.to(loop.device, non_blocking=True)) for images, labels in bar)
        after_step = _after_step(bar, checkpoints, cfg.checkpoint_steps, per_epoch)
        try:
            stats = train_one_epoch(state, batches, loop, after_step)
        except TrainingDiverged as err:  # the stage and the checkpoint that survives
            raise TrainingDiverged(f"{desc}: {err}; the last good checkpoint is kept ({checkpoint})") from None
        accuracy = evaluate(model, data.test, normalize, loop.eval_batch_size, progress)
        state.history.append(stats.record(accuracy))
        log.info(f"{desc} epoch {stats.epoch}/{cfg.epochs}: loss {stats.train_loss:.4f}, "
                 f"test acc {accuracy:.2f}%, penalty {stats.penalty:.4g}")
        state.finish_epoch()
        checkpoints.save(state)
    if accuracy is None:
        accuracy = evaluate(model, data.test, normalize, loop.eval_batch_size)
    return TrainResult(cfg.epochs, state.seconds, accuracy, state.history, state.precision)
