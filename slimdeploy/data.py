"""Data: CIFAR-10/100 from the official python-batch layout, and a synthetic learnable set.

Images are held as uint8 tensors [N, 3, H, W] in memory; batching, augmentation (pad-4 random crop and
horizontal flip, drawn per image) and normalisation run batched in torch, so the training loop needs no
DataLoader workers or per-sample PIL calls.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


class DataError(RuntimeError):
    """The data set cannot be read; the message says where the files are expected."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def default_root() -> Path:
    return Path(os.environ.get("SLIMDEPLOY_DATA", Path.home() / ".cache" / "slimdeploy"))


def _read_batches(folder: Path, files: list[str], label_key: bytes) -> Split:
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise DataError(f"{path}: not a readable CIFAR python batch ({type(err).__name__}: {err})") from None
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def load_cifar(name: str, root: str | Path | None = None) -> Dataset:
    """CIFAR-10/100 from ROOT/cifar-10-batches-py or ROOT/cifar-100-python (the official python archives)."""
    folder_name, train_files, test_files, label_key, num_classes = _LAYOUT[name]
    root = Path(root) if root else default_root()
    folder = root / folder_name
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        _try_download(name, root)
        missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{name}: expected {folder}/{missing[0]} (the official python-version archive, unpacked); "
            f"set data.root or SLIMDEPLOY_DATA to the folder holding {folder_name}/, "
            f"or run with --set data.name=synthetic"
        )
    return Dataset(
        name,
        _read_batches(folder, train_files, label_key),
        _read_batches(folder, test_files, label_key),
        num_classes,
        CIFAR_MEAN[name],
        CIFAR_STD[name],
    )


def _try_download(name: str, root: Path) -> None:
    """Fetch the official archive with torchvision's downloader where the network allows; silent otherwise."""
    try:
        from torchvision.datasets import CIFAR10, CIFAR100

        (CIFAR10 if name == "cifar10" else CIFAR100)(str(root), download=True)
    except Exception:  # no network, no write access: the caller reports what is missing
        pass


def make_synthetic(
    num_classes: int = 10,
    image_size: int = 32,
    train_size: int = 4096,
    test_size: int = 1024,
    seed: int = 0,
) -> Dataset:
    """A deterministic, learnable image set: each class is a smooth random template plus per-image noise.

    Templates are low-frequency colour patterns, so a small CNN separates the classes within a few
    epochs, while noise and a random brightness shift keep it from being trivial.
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=gen)
    templates = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bicubic")

    def split(n: int) -> Split:
        labels = torch.randint(num_classes, (n,), generator=gen)
        noise = torch.randn(n, 3, image_size, image_size, generator=gen) * 0.25
        shift = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
        pixels = (templates[labels] + noise + shift).clamp(0, 1)
        return Split((pixels * 255).round().to(torch.uint8), labels)

    train, test = split(train_size), split(test_size)
    return Dataset("synthetic", train, test, num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def load_dataset(cfg, seed: int = 0) -> Dataset:
    """The data set a recipe's ``data`` section names."""
    if cfg.name == "synthetic":
        return make_synthetic(cfg.num_classes, cfg.image_size, cfg.train_size, cfg.test_size, seed)
    return load_cifar(cfg.name, cfg.root)


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, drawn independently per image."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(images.device)
    flip = torch.rand(n, generator=gen, device=gen.device).to(images.device) < 0.5
    rows = dy[:, None] + torch.arange(h, device=images.device)  # [n, h]
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=images.device)[:, None, None, None]
    idx_c = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


class Normalize:
    """uint8 → float, normalised; on the target device and memory format."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def _step_seed(*parts: int) -> int:
    """A seed that is a pure function of (seed, epoch, step, rank): any step can be replayed alone."""
    x = 0
    for part in parts:
        x = (x * 1_000_003 + part) % (2**63 - 1)
    return x


def steps_per_epoch(split: Split, batch_size: int, world: int = 1) -> int:
    return len(split) // (batch_size * world)


def train_batches(
    split: Split,
    batch_size: int,
    seed: int,
    epoch: int,
    augment_images: bool,
    start_step: int = 0,
    rank: int = 0,
    world: int = 1,
):
    """This process's shuffled batches of one epoch (uint8 images, labels), from ``start_step`` on.

    The order and the augmentation depend only on (seed, epoch, step, rank), so a resumed run sees
    exactly the batches an uninterrupted one would. With ``world`` processes each step takes
    ``world`` consecutive batches of the epoch's permutation and this process the ``rank``-th.
    """
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(_step_seed(seed, epoch)))
    for step in range(start_step, steps_per_epoch(split, batch_size, world)):
        start = (step * world + rank) * batch_size
        idx = order[start : start + batch_size]
        images = split.images[idx]
        if augment_images:
            images = augment(images, torch.Generator().manual_seed(_step_seed(seed, epoch, step, rank)))
        yield images, split.labels[idx]


def eval_batches(split: Split, batch_size: int):
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size], split.labels[start : start + batch_size]
