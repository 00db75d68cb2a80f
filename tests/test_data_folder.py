"""Class-folder and user-factory data: loading, per-sample augmentation, resume, and one-line errors."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from slimdeploy import imports
from slimdeploy.data import (
    DataError, FolderSplit, Normalize, eval_batches, first_images, load_dataset, load_factory, load_image_folder,
    make_transforms, steps_per_epoch, train_batches,
)
from slimdeploy.errors import InputError
from slimdeploy.models import build_model
from slimdeploy.recipe import DataCfg, FinetuneCfg, RecipeError, build_recipe
from slimdeploy.sparsity import make_sparsifier
from slimdeploy.train import train


def _pixels(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_folder(root, classes=("cat", "dog", "eel"), per_class=4, size=(32, 32), val_classes=None):
    """PNG files (lossless, so decoded pixels are the written ones); returns {path: HWC pixels}."""
    written = {}
    for part, names in (("train", classes), ("val", val_classes or classes)):
        for c, name in enumerate(names):
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = _pixels(hash((part, c, i)) % 2**32, *size)
                Image.fromarray(pixels).save(folder / f"{i}.png")
                written[folder / f"{i}.png"] = pixels
    return written


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- loading

def test_image_folder_classes_shapes_labels_and_pixels(tmp_path):
    written = _write_folder(tmp_path, per_class=3, size=(32, 32))
    data = load_image_folder(tmp_path, image_size=28, augmentation="imagenet")
    assert data.num_classes == 3 and len(data.train) == len(data.test) == 9
    assert data.input_shape == (3, 28, 28) and data.train.input_shape == (3, 28, 28)
    images, labels = zip(*eval_batches(data.test, 4))
    assert [len(batch) for batch in images] == [4, 4, 1]
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.dtype == torch.uint8 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # imagenet evaluation: resize to 28 / 0.875 = 32 (the file's size, so untouched), centre crop 28
    val_files = sorted(p for p in written if p.parts[-3] == "val")
    for image, path in zip(images, val_files):
        assert torch.equal(image, _chw(written[path])[:, 2:30, 2:30]), path
    assert torch.equal(first_images(data.test, 5), images[:5])


def test_rectangular_images_are_resized_and_centre_cropped(tmp_path):
    _write_folder(tmp_path, classes=("a", "b"), per_class=2, size=(40, 64))
    data = load_image_folder(tmp_path, image_size=20, augmentation="cifar")
    images, _ = next(train_batches(data.train, 4, seed=0, epoch=0, augment_images=True))
    assert images.shape == (4, 3, 20, 20) and first_images(data.test, 4).shape == (4, 3, 20, 20)


def test_recipe_data_defaults_and_overrides(tmp_path):
    _write_folder(tmp_path, classes=("a", "b"), per_class=2, size=(16, 16))
    folder = DataCfg(name="imagefolder", root=str(tmp_path))
    assert (folder.input_size, folder.augmentation) == (224, "imagenet")
    data = load_dataset(folder)
    assert data.input_shape == (3, 224, 224) and data.mean == (0.485, 0.456, 0.406)
    assert (DataCfg().input_size, DataCfg().augmentation, DataCfg(augment=False).augmentation) == (32, "cifar", "none")
    assert DataCfg(name="imagefolder", augment=False).augmentation == "none"
    synthetic = load_dataset(DataCfg(name="synthetic", train_size=16, test_size=16, mean=[0.1, 0.2, 0.3]))
    assert synthetic.mean == (0.1, 0.2, 0.3) and synthetic.std == (0.25, 0.25, 0.25)
    assert synthetic.input_shape == (3, 32, 32)


@pytest.mark.parametrize("setting, key", [
    ("data.name=imagenet", "data.name"),
    ("data.image_size=64", "data.image_size"),  # CIFAR is 32 px only
    ("data.augment=imagenet", "data.augment"),  # not for CIFAR
    ("data.augment=flip", "data.augment"),
    ("data.mean=[0.5, 0.5]", "data.mean"),
    ("data.std=[0.2, 0, 0.2]", "data.std"),
    ("data.workers=-1", "data.workers"),
])
def test_bad_data_keys_are_one_line_recipe_errors(setting, key):
    with pytest.raises(RecipeError, match=re.escape(key)) as info:
        build_recipe({}, [setting])
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- augmentation and resume

class _Indexed(torch.utils.data.Dataset):
    """Random uint8 images labelled with their own index, so a batch says which samples it holds."""

    def __init__(self, n=24, size=20):
        gen = torch.Generator().manual_seed(1)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
        self.reads = []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.images[index], index


def _indexed_split(augmentation="imagenet", workers=0, samples=None):
    samples = samples or _Indexed()
    augment_view, eval_view = make_transforms(16, augmentation)
    return FolderSplit(samples, 16, augment_view, eval_view, len(samples), "test", workers)


def _epoch_by_index(split, batch_size=4, seed=0, epoch=0, world=1, augment=True):
    views = {}
    for rank in range(world):
        for images, labels in train_batches(split, batch_size, seed, epoch, augment, rank=rank, world=world):
            views.update(zip(labels.tolist(), images))
    return views


def test_augmentation_is_a_function_of_seed_epoch_and_index_only():
    split = _indexed_split()
    base = _epoch_by_index(split)
    assert sorted(base) == list(range(24))
    for other in (_epoch_by_index(split, batch_size=8), _epoch_by_index(split, batch_size=6, world=2),
                  _epoch_by_index(_indexed_split(workers=2), batch_size=3)):
        assert sorted(other) == sorted(base) and all(torch.equal(other[i], base[i]) for i in base)
    for changed in (_epoch_by_index(split, epoch=1), _epoch_by_index(split, seed=1)):
        assert sum(not torch.equal(changed[i], base[i]) for i in base) > 20
    evaluation = first_images(split, 24)
    plain = _epoch_by_index(split, augment="none")
    assert all(torch.equal(plain[i], evaluation[i]) for i in plain)


def test_identical_images_get_different_crops_at_different_indices():
    samples = _Indexed()
    samples.images[:] = samples.images[0]
    views = list(_epoch_by_index(_indexed_split(samples=samples)).values())
    assert len({tuple(view.flatten().tolist()) for view in views}) > 20


def test_augmentation_ignores_and_keeps_the_global_rng():
    split = _indexed_split()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = _epoch_by_index(split)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(6)
    assert all(torch.equal(image, first[i]) for i, image in _epoch_by_index(split).items())


def test_cifar_augmentation_shifts_within_padding_or_flips():
    split = _indexed_split(augmentation="cifar", samples=_Indexed(size=16))
    views = _epoch_by_index(split)
    padded = torch.nn.functional.pad(split.samples.images, (2, 2, 2, 2))
    for i, view in views.items():
        windows = [padded[i, :, y:y + 16, x:x + 16] for y in range(5) for x in range(5)]
        assert any(torch.equal(view, w) or torch.equal(view, w.flip(-1)) for w in windows)
    assert sum(not torch.equal(view, split.samples.images[i]) for i, view in views.items()) > 12


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_batches_same_for_any_worker_count(tmp_path, workers):
    _write_folder(tmp_path, per_class=4, size=(36, 30))
    reference = list(train_batches(load_image_folder(tmp_path, 24).train, 4, seed=3, epoch=2, augment_images=True))
    batches = list(train_batches(load_image_folder(tmp_path, 24, workers=workers).train, 4, seed=3, epoch=2,
                                 augment_images=True))
    assert len(batches) == steps_per_epoch(load_image_folder(tmp_path, 24).train, 4) == 3
    for (images, labels), (ref_images, ref_labels) in zip(batches, reference, strict=True):
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


def test_resume_skips_batches_without_decoding_them():
    split = _indexed_split()
    full = list(train_batches(split, 4, seed=0, epoch=1, augment_images=True))
    split.samples.reads.clear()
    tail = list(train_batches(split, 4, seed=0, epoch=1, augment_images=True, start_step=4))
    assert len(tail) == len(full) - 4 == 2
    for (images, labels), (full_images, full_labels) in zip(tail, full[4:]):
        assert torch.equal(images, full_images) and torch.equal(labels, full_labels)
    assert sorted(split.samples.reads) == sorted(torch.cat([labels for _, labels in tail]).tolist())


@pytest.mark.slow
def test_trains_and_evaluates_on_folder_data(tmp_path):
    _write_folder(tmp_path, classes=("a", "b"), per_class=8, size=(20, 20))
    data = load_image_folder(tmp_path, image_size=16)
    model = build_model("resnet20", data.num_classes)
    result = train(model, data, FinetuneCfg(epochs=1, lr=0.01), batch_size=4, eval_batch_size=8, augment="imagenet",
                   normalize=Normalize(data.mean, data.std, "cpu"),
                   sparsifier=make_sparsifier(model, method="none"), seed=0, progress=False)
    assert np.isfinite(result.history[0]["train_loss"]) and 0 <= result.accuracy <= 100


# ---------------------------------------------------------------- folder errors

def test_image_folder_errors(tmp_path):
    _one_line_error("data.root: imagefolder needs", load_image_folder, None)
    _one_line_error(re.escape(f"{tmp_path / 'nope'}: data.root not found"), load_image_folder, tmp_path / "nope")
    (tmp_path / "train").mkdir()
    _one_line_error("class folder", load_image_folder, tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    _one_line_error(re.escape(f"{tmp_path / 'train'}: ") + ".*no valid file", load_image_folder, tmp_path)
    Image.fromarray(_pixels(0, 8, 8)).save(tmp_path / "train" / "cat" / "0.png")
    _one_line_error(re.escape(f"{tmp_path / 'val'}: not found"), load_image_folder, tmp_path)


def test_train_and_val_classes_must_agree(tmp_path):
    _write_folder(tmp_path, classes=("a", "b", "c"), val_classes=("a", "b", "d"), per_class=1, size=(8, 8))
    _one_line_error(r"different classes \(only in train/: c; only in val/: d\)", load_image_folder, tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_names_the_file(tmp_path, workers):
    _write_folder(tmp_path, classes=("a", "b"), per_class=3, size=(8, 8))
    broken = tmp_path / "train" / "b" / "1.png"
    broken.write_bytes(b"not a png")
    data = load_image_folder(tmp_path, 8, workers=workers)
    message = _one_line_error(re.escape(f"{broken}: cannot read image"), list,
                              train_batches(data.train, 2, seed=0, epoch=0, augment_images=True))
    assert "Traceback" not in message


# ---------------------------------------------------------------- user factories

FACTORY = '''
import torch
from PIL import Image


class Pairs(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def make():
    gray = Image.new("L", (12, 12), color=77)
    tensor = torch.full((3, 12, 12), 200, dtype=torch.uint8)
    return Pairs([(gray, 0), (tensor, 1), (tensor, torch.tensor(2))]), Pairs([(tensor, 2)]), 3


def floats():
    return Pairs([(torch.rand(3, 12, 12), 0)]), Pairs([(torch.rand(3, 12, 12), 0)]), 2


def label_too_big():
    tensor = torch.zeros((3, 12, 12), dtype=torch.uint8)
    return Pairs([(tensor, 0)]), Pairs([(tensor, 5)]), 2


def pair():
    return make()[:2]


def class_count_as_text():
    return make()[0], make()[1], "3"


def empty():
    return Pairs([]), make()[1], 3


def fails():
    raise OSError("no such share\\nmounted")


NOT_CALLABLE = 3
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "user_data.py"
    path.write_text(FACTORY)
    return path


@pytest.mark.parametrize("form", ["file", "module"])
def test_factory_by_file_path_or_module(factory_file, monkeypatch, form):
    if form == "module":
        monkeypatch.syspath_prepend(str(factory_file.parent))
        spec = "user_data:make"
    else:
        spec = f"{factory_file}:make"
    data = load_dataset(DataCfg(name=spec, image_size=12, augment=False))
    assert data.num_classes == 3 and len(data.train) == 3 and data.input_shape == (3, 12, 12)
    assert data.mean == (0.485, 0.456, 0.406)
    images, labels = next(train_batches(data.train, 3, seed=0, epoch=0, augment_images=False))
    by_label = dict(zip(labels.tolist(), images))
    assert torch.equal(by_label[0], torch.full((3, 12, 12), 77, dtype=torch.uint8))  # grayscale made RGB
    assert torch.equal(by_label[1], torch.full((3, 12, 12), 200, dtype=torch.uint8))
    assert by_label.keys() == {0, 1, 2}


@pytest.mark.parametrize("name, match", [
    ("fails", r"the factory raised OSError: no such share mounted"),
    ("pair", r"must return \(train, val, num_classes\).*got a tuple of \(Pairs, Pairs\)"),
    ("class_count_as_text", r"got a tuple of \(Pairs, Pairs, str\)"),
    ("empty", r"neither empty"),
    ("floats", r"train item 0: the image must be a PIL image or a uint8 \[3, H, W\] tensor, got a torch.float32"),
    ("label_too_big", r"val item 0: the label must be an integer in \[0, 2\), got 5"),
    ("NOT_CALLABLE", r"not a callable"),
    ("absent", r"has no attribute 'absent'"),
])
def test_factory_errors_name_the_spec(factory_file, name, match):
    spec = f"{factory_file}:{name}"
    message = _one_line_error(match, load_factory, spec, 12)
    assert spec in message or str(factory_file) in message


def test_factory_spec_not_found():
    _one_line_error(r"data.name: file not found: nowhere/data\.py", load_factory, "nowhere/data.py:make")
    _one_line_error(r"data.name: cannot import 'no_such_module_xyz'", load_factory, "no_such_module_xyz:make")


# ---------------------------------------------------------------- the shared import-path resolver

def test_resolve_loads_module_and_file_attributes(factory_file):
    import os.path

    assert imports.resolve("os.path:join", "model.name") is os.path.join
    assert imports.resolve("collections:OrderedDict.fromkeys", "model.name") is not None
    make = imports.resolve(f"{factory_file}:make", "model.name")
    assert imports.resolve(f"{factory_file}:make", "model.name") is make  # the file runs once
    assert make()[2] == 3


@pytest.mark.parametrize("spec, match", [
    ("no_colon", "not an import path"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("json:nothing_here", "has no attribute 'nothing_here'"),
    ("math:pi", "not a callable"),
    ("missing/file.py:f", "file not found: missing/file.py"),
])
def test_resolve_errors_are_one_line_and_name_the_key(spec, match):
    with pytest.raises(InputError, match=match) as info:
        imports.resolve(spec, "model.name")
    assert str(info.value).startswith("model.name: ") and "\n" not in str(info.value)


def test_resolve_reports_a_file_that_fails_to_run(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('half written')\n")
    with pytest.raises(InputError, match="running .*bad.py raised RuntimeError: half written"):
        imports.resolve(f"{bad}:f", "data.name")


# ---------------------------------------------------------------- holdout

def test_holdout_moves_a_fixed_draw_of_training_images_to_evaluation():
    cfg = DataCfg(name="synthetic", train_size=64, test_size=16, holdout=10)
    full, held = load_dataset(DataCfg(name="synthetic", train_size=64, test_size=16)), load_dataset(cfg)
    assert len(held.train) == 54 and len(held.test) == 10
    rows = {tuple(img.flatten().tolist()): int(label) for img, label in zip(full.train.images, full.train.labels)}
    for split in (held.train, held.test):  # every image is a training image, with its own label
        assert all(rows[tuple(img.flatten().tolist())] == int(label) for img, label in zip(split.images, split.labels))
    both = torch.cat([held.train.images, held.test.images]).flatten(1)
    assert len(torch.unique(both, dim=0)) == 64  # disjoint, and together the whole training split


def test_holdout_of_a_folder_is_evaluated_without_augmentation(tmp_path):
    written = {str(path): pixels for path, pixels in
               _write_folder(tmp_path, classes=("a", "b"), per_class=6, size=(16, 16)).items()}
    data = load_dataset(DataCfg(name="imagefolder", root=str(tmp_path), image_size=16, augment=False, holdout=4))
    assert len(data.train) == 8 and len(data.test) == 4 and data.test.augmentation is None
    images = torch.cat([batch for batch, _ in eval_batches(data.test, 3)])
    names = [data.test.item_name(i) for i in range(4)]  # the files behind the held-out items
    assert all("/train/" in name for name in names) and len(set(names)) == 4
    for image, name in zip(images, names):
        assert torch.equal(image, _chw(written[name])), name


@pytest.mark.parametrize("n", [64, 100])
def test_holdout_must_leave_training_images(n):
    _one_line_error(r"data.holdout: .* between 1 and 63", load_dataset,
                    DataCfg(name="synthetic", train_size=64, test_size=16, holdout=n))
