"""Data: CIFAR-10/100 from the official python-batch layout, a synthetic learnable set, class folders
read by torchvision's ImageFolder, and a user factory's torch Datasets.

CIFAR and synthetic images are held as uint8 tensors [N, 3, H, W] in memory (:class:`Split`); batching,
augmentation (pad-4 random crop and horizontal flip, drawn per image) and normalisation run batched in
torch, so the training loop needs no DataLoader workers or per-sample PIL calls. Folder and factory
images (:class:`FolderSplit`) are decoded and transformed per sample in a DataLoader and reach the
training loop in the same form: uint8 [B, 3, S, S] batches, normalised on the device by :class:`Normalize`.
"""

from __future__ import annotations

import itertools
import operator
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from slimdeploy import imports
from slimdeploy.errors import InputError, SlimdeployError
from slimdeploy.registry import Registry

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_EVAL_CROP = 0.875  # evaluation resizes to S / 0.875 and centre-crops S (224 from 256)
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


class DataError(SlimdeployError, RuntimeError):
    """Data that cannot be used (a folder, file or factory the user named); the message names it."""

    exit_code = 2


class DataNotFound(DataError):
    """A shipped data set (CIFAR) is not where it is expected; the message says where to put it."""

    exit_code = 1


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


@dataclass
class FolderSplit:
    """Images decoded per sample from a torch Dataset of (image, label): an ImageFolder or a factory's.

    Training batches apply ``augmentation`` to each sample under a seed of (seed, epoch, index), so its
    random crop depends neither on the batch it lands in, nor on the DataLoader workers, nor on the
    global RNG; evaluation batches apply ``evaluation``. Both end in uint8 [3, S, S].
    """

    samples: TorchDataset
    image_size: int
    augmentation: Callable | None  # None: training sees the evaluation view
    evaluation: Callable
    num_classes: int
    source: str  # names the data in error messages
    workers: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def item_name(self, index: int) -> str:
        samples = self.samples
        while isinstance(samples, Subset):  # a held-out part: name the file behind it
            samples, index = samples.dataset, samples.indices[index]
        if isinstance(samples, ImageFolder):
            return samples.samples[index][0]
        return f"{self.source} item {index}"

    def batches(self, index_batches: list[list[int]], seed_epoch: tuple[int, int] | None = None):
        """(uint8 [B, 3, S, S] images, int64 labels) per batch of indices; augmented if ``seed_epoch`` is given."""
        if not index_batches:
            return
        loader = DataLoader(
            _Decoded(self, seed_epoch), batch_sampler=index_batches, num_workers=self.workers,
            collate_fn=_collate, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(0),  # else the loader draws its worker seed from the global RNG
        )
        for batch in loader:
            if isinstance(batch, _Failure):
                raise DataError(batch.message)
            yield batch


@dataclass
class _Failure:
    """Returned in place of a sample that cannot be read, so the error reaches the training process as one line."""

    message: str


class _Decoded(TorchDataset):
    """A FolderSplit's samples as (uint8 [3, S, S], label), or a _Failure naming the sample."""

    def __init__(self, split: FolderSplit, seed_epoch: tuple[int, int] | None):
        self.split, self.seed_epoch = split, seed_epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:
            image, label = self.split.samples[index]
            return self._transform(_as_image(image), index), _as_label(label, self.split.num_classes)
        except DataError as err:
            return _Failure(f"{self.split.item_name(index)}: {err}")
        except Exception as err:  # a broken file, or anything a user's data set raises
            reason = f"{type(err).__name__}: {_one_line(err)}"
            return _Failure(f"{self.split.item_name(index)}: cannot read image ({reason})")

    def _transform(self, image: torch.Tensor, index: int) -> torch.Tensor:
        if self.seed_epoch is None or self.split.augmentation is None:
            return self.split.evaluation(image)
        with torch.random.fork_rng(devices=[]):  # v2 transforms draw from the global CPU generator
            torch.default_generator.manual_seed(_step_seed(*self.seed_epoch, index))
            return self.split.augmentation(image)


def _as_image(image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return v2.functional.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return image
    is_tensor = isinstance(image, torch.Tensor)
    got = f"a {image.dtype} tensor of shape {list(image.shape)}" if is_tensor else type(image).__name__
    raise DataError(f"the image must be a PIL image or a uint8 [3, H, W] tensor, got {got}")


def _as_label(label, num_classes: int) -> int:
    try:
        value = operator.index(label)
    except TypeError:
        value = None
    if value is None or not 0 <= value < num_classes:
        raise DataError(f"the label must be an integer in [0, {num_classes}), got {label!r}")
    return value


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor] | _Failure:
    failure = next((item for item in items if isinstance(item, _Failure)), None)
    if failure:
        return failure
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


@dataclass
class Dataset:
    name: str
    train: Split | FolderSplit
    test: Split | FolderSplit
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.input_shape


def default_root() -> Path:
    return Path(os.environ.get("SLIMDEPLOY_DATA", Path.home() / ".cache" / "slimdeploy"))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR python batch holds (dicts, lists, ints, bytes and numpy arrays):
    any other global is refused before it is imported, so a planted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # files pickled with numpy 1.x (the official ones)
        ("numpy._core.multiarray", "_reconstruct"),  # files pickled with numpy 2.x
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),  # numpy integers, e.g. labels written as list(array)
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}; a CIFAR batch holds only "
                                         f"dicts, lists, ints, bytes and numpy arrays")
        return super().find_class(module, name)


def _read_batches(folder: Path, files: list[str], label_key: bytes) -> Split:
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as fh:
                batch = _CifarUnpickler(fh, encoding="bytes").load()
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
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
        raise DataNotFound(
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


def make_transforms(size: int, augmentation: str) -> tuple[Callable | None, Callable]:
    """Per-sample (augmentation or None, evaluation) v2 transforms from uint8 [3, H, W] to [3, S, S].

    imagenet: random resized crop and flip; evaluation resizes to S/0.875 and centre-crops S. cifar: the
    image resized to S, randomly shifted within S/8 zero padding, and flipped; evaluation resizes the
    shorter side to S and centre-crops, as does none.
    """
    if augmentation == "imagenet":
        evaluation = v2.Compose([v2.Resize(round(size / IMAGENET_EVAL_CROP)), v2.CenterCrop(size)])
        return v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]), evaluation
    evaluation = v2.Compose([v2.Resize(size), v2.CenterCrop(size)])
    if augmentation == "cifar":
        return v2.Compose([evaluation, v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()]), evaluation
    return None, evaluation


def load_image_folder(root, image_size: int = 224, augmentation: str = "imagenet", workers: int = 0) -> Dataset:
    """ROOT/train/<class>/* and ROOT/val/<class>/*, read by torchvision's ImageFolder and decoded per batch."""
    if root is None:
        raise DataError("data.root: imagefolder needs the folder holding train/ and val/")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data.root not found (imagefolder reads ROOT/train/<class>/ and ROOT/val/<class>/)")
    train, val = _image_folder(root / "train"), _image_folder(root / "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"{root}: train/ and val/ hold different classes "
                        f"(only in train/: {_few(only_train)}; only in val/: {_few(only_val)})")
    return _folder_dataset("imagefolder", train, val, len(train.classes), str(root), image_size, augmentation, workers)


def _image_folder(folder: Path) -> ImageFolder:
    if not folder.is_dir():
        raise DataError(f"{folder}: not found; imagefolder reads ROOT/train/ and ROOT/val/, each with one "
                        f"folder of images per class")
    try:
        return ImageFolder(str(folder))
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise DataError(f"{folder}: {_one_line(err)}") from None


def _few(names: list[str], shown: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def load_factory(spec: str, image_size: int = 224, augmentation: str = "imagenet", workers: int = 0) -> Dataset:
    """The (train, val, num_classes) a user function returns (see the recipe's ``data.name``)."""
    try:
        factory = imports.resolve(spec, "data.name")
    except InputError as err:
        raise DataError(str(err)) from None
    try:
        result = factory()
    except Exception as err:
        raise DataError(f"data.name {spec}: the factory raised {type(err).__name__}: {_one_line(err)}") from None
    if not _is_factory_result(result):
        got = (f"a tuple of ({', '.join(type(part).__name__ for part in result)})" if isinstance(result, tuple)
               else f"a {type(result).__name__}")
        raise DataError(f"data.name {spec}: the factory must return (train, val, num_classes): two torch "
                        f"Datasets of (image, label), neither empty, and an integer ≥ 2; got {got}")
    data = _folder_dataset(spec, *result, spec, image_size, augmentation, workers)
    for split in (data.train, data.test):  # a wrong image or label type shows now, not mid-training
        first_images(split, 1)
    return data


def _is_factory_result(result) -> bool:
    if not (isinstance(result, tuple) and len(result) == 3):
        return False
    train, val, num_classes = result
    splits_ok = all(hasattr(s, "__getitem__") and hasattr(s, "__len__") and len(s) > 0 for s in (train, val))
    return splits_ok and isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 2


def _folder_dataset(name, train, val, num_classes, source, image_size, augmentation, workers) -> Dataset:
    augment_view, eval_view = make_transforms(image_size, augmentation)
    splits = [FolderSplit(samples, image_size, augment_view, eval_view, num_classes, f"{source} {part}", workers)
              for samples, part in ((train, "train"), (val, "val"))]
    return Dataset(name, *splits, num_classes, IMAGENET_MEAN, IMAGENET_STD)


# The named data sets, each loaded from a recipe's data section and the seed; any other data.name is a
# factory's import path.
DATASETS: Registry[Callable[[Any, int], Dataset]] = Registry("data set")
for _cifar in _LAYOUT:
    DATASETS.register(_cifar, description=f"{_cifar} in memory, from data.root")(
        lambda cfg, seed: load_cifar(cfg.name, cfg.root))
DATASETS.register("synthetic", description="random images of data.num_classes learnable classes")(
    lambda cfg, seed: make_synthetic(cfg.num_classes, cfg.input_size, cfg.train_size, cfg.test_size, seed))
DATASETS.register("imagefolder", description="data.root/train/<class>/ and data.root/val/<class>/ image files")(
    lambda cfg, seed: load_image_folder(cfg.root, cfg.input_size, cfg.augmentation, cfg.workers))


def load_dataset(cfg, seed: int = 0) -> Dataset:
    """The data set a recipe's ``data`` section names, with its mean and std unless the recipe sets them,
    and with ``data.holdout`` training images in place of its test split when that is set."""
    if cfg.name in DATASETS:
        data = DATASETS.get(cfg.name)(cfg, seed)
    else:
        data = load_factory(cfg.name, cfg.input_size, cfg.augmentation, cfg.workers)
    if cfg.holdout:
        data = hold_out(data, cfg.holdout)
    return replace(data, mean=cfg.mean or data.mean, std=cfg.std or data.std)


HOLDOUT_SEED = 20170801  # fixed, not the recipe's seed: every run of a search must see the same split


def hold_out(data: Dataset, n: int) -> Dataset:
    """``data`` with ``n`` training images, drawn once by a fixed seed, moved to be its evaluation split
    (the test split is set aside): a validation set for choosing settings without seeing the test set."""
    if not 0 < n < len(data.train):
        raise DataError(f"data.holdout: {n} must be between 1 and {len(data.train) - 1}, "
                        f"the {data.name} training split has {len(data.train)} images")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    keep, held = order[n:].sort().values, order[:n].sort().values
    return replace(data, name=f"{data.name} (holdout {n})", train=_subset(data.train, keep),
                   test=_subset(data.train, held, evaluation=True))


def _subset(split: Split | FolderSplit, indices: torch.Tensor, evaluation: bool = False) -> Split | FolderSplit:
    if isinstance(split, Split):
        return Split(split.images[indices], split.labels[indices])
    return replace(split, samples=Subset(split.samples, indices.tolist()),
                   augmentation=None if evaluation else split.augmentation)


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, drawn independently per image."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(images.device)
    flip = torch.rand(n, generator=gen, device=gen.device).to(images.device) < 0.5
    rows = dy[:, None] + torch.arange(h, device=images.device)  # [n, h]
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # one gather over each image's flattened pixels: ~15× faster on CPU than 4-way advanced indexing
    pixels = (rows[:, :, None] * padded.shape[-1] + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, pixels).view(n, c, h, w)


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
    """A seed that is a pure function of its parts, e.g. (seed, epoch, step, rank): any step can be replayed alone."""
    x = 0
    for part in parts:
        x = (x * 1_000_003 + part) % (2**63 - 1)
    return x


def steps_per_epoch(split: Split | FolderSplit, batch_size: int, world: int = 1) -> int:
    return len(split) // (batch_size * world)


def train_batches(
    split: Split | FolderSplit,
    batch_size: int,
    seed: int,
    epoch: int,
    augment_images: bool | str,
    start_step: int = 0,
    rank: int = 0,
    world: int = 1,
):
    """This process's shuffled batches of one epoch (uint8 images, labels), from ``start_step`` on.

    The order and the augmentation depend only on (seed, epoch, step, rank), so a resumed run sees
    exactly the batches an uninterrupted one would; a folder split draws each sample's augmentation
    from (seed, epoch, index) and never decodes the skipped batches. With ``world`` processes each step
    takes ``world`` consecutive batches of the epoch's permutation and this process the ``rank``-th.
    ``augment_images``: True or an augmentation name applies the split's augmentation, False or "none" not.
    """
    augments = augment_images not in (False, "none")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(_step_seed(seed, epoch)))
    steps = range(start_step, steps_per_epoch(split, batch_size, world))
    if isinstance(split, FolderSplit):
        index_batches = [order[(step * world + rank) * batch_size :][:batch_size].tolist() for step in steps]
        yield from split.batches(index_batches, (seed, epoch) if augments else None)
        return
    for step in steps:
        start = (step * world + rank) * batch_size
        idx = order[start : start + batch_size]
        images = split.images[idx]
        if augments:
            images = augment(images, torch.Generator().manual_seed(_step_seed(seed, epoch, step, rank)))
        yield images, split.labels[idx]


def labelled_batches(split: Split | FolderSplit, batch_size: int, images: int, seed: int, normalize: Normalize):
    """About ``images`` images of ``split`` with their labels, normalised and not augmented, one batch at
    a time: for gradients taken outside training (``importance: taylor``). At least one batch, at most
    one epoch."""
    size = min(batch_size, len(split))
    batches = train_batches(split, size, seed, 0, False)
    return ((normalize(x), y) for x, y in itertools.islice(batches, max(1, images // size)))


def eval_batches(split: Split | FolderSplit, batch_size: int):
    if isinstance(split, FolderSplit):
        yield from split.batches([list(range(start, min(start + batch_size, len(split))))
                                  for start in range(0, len(split), batch_size)])
        return
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size], split.labels[start : start + batch_size]


def first_images(split: Split | FolderSplit, n: int) -> torch.Tensor:
    """The first ``n`` images, uint8 [n, 3, S, S], as evaluation sees them: for calibration and export checks."""
    if isinstance(split, FolderSplit):
        return next(split.batches([list(range(min(n, len(split))))]))[0]
    return split.images[:n]
