"""Data sets, batched augmentation, and the training loop's checkpoints and resume."""

import pickle

import numpy as np
import pytest
import torch

from slimdeploy.data import DataError, Normalize, augment, load_cifar, make_synthetic
from slimdeploy.models import build_model
from slimdeploy.recipe import FinetuneCfg, SparsityCfg
from slimdeploy.sparsity import make_sparsifier
from slimdeploy.train import CheckpointError, TrainingDiverged, load_checkpoint, save_atomic, train


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_synthetic(seed=3, train_size=256, test_size=64), make_synthetic(seed=3, train_size=256, test_size=64)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.dtype == torch.uint8 and a.input_shape == (3, 32, 32)
    assert not torch.equal(a.train.images, make_synthetic(seed=4, train_size=256, test_size=64).train.images)
    assert len(a.train.labels.unique()) == 10


def test_augment_is_a_per_image_shifted_crop_or_flip():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    out = augment(images, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def _write_cifar(root, name):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        folder = root / "cifar-100-python"
        files, key, classes = ["train", "test"], b"fine_labels", 100
    folder.mkdir(parents=True)
    for f in files:
        batch = {b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8), key: list(rng.integers(0, classes, 7))}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh)
    return folder, files


@pytest.mark.parametrize("name, n_train, classes", [("cifar10", 35, 10), ("cifar100", 7, 100)])
def test_reads_official_cifar_layout(tmp_path, name, n_train, classes):
    folder, files = _write_cifar(tmp_path, name)
    ds = load_cifar(name, tmp_path)
    assert ds.train.images.shape == (n_train, 3, 32, 32) and len(ds.test) == 7 and ds.num_classes == classes
    with open(folder / files[0], "rb") as fh:
        raw = pickle.load(fh)
    assert torch.equal(ds.train.images[0].flatten(), torch.from_numpy(raw[b"data"][0]))


def test_missing_and_broken_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py.*data.name=synthetic"):
        load_cifar("cifar10", tmp_path / "nothing")
    folder, files = _write_cifar(tmp_path, "cifar10")
    (folder / files[2]).write_bytes(b"garbage")
    with pytest.raises(DataError, match=files[2]):
        load_cifar("cifar10", tmp_path)


def _setup(seed=0):
    torch.manual_seed(seed)
    data = make_synthetic(num_classes=4, image_size=16, train_size=256, test_size=64, seed=0)
    model = build_model("resnet20", 4)
    sp = make_sparsifier(model, SparsityCfg(method="proximal", penalty="tl1", lam=0.05, a=1.0, beta=10.0))
    return data, model, sp


def _cfg(epochs):
    return FinetuneCfg(epochs=epochs, lr=0.05, schedule="multistep", milestones=[0.5], checkpoint_steps=3)


def _train(data, model, sp, epochs, ckpt, resume=False):
    return train(model, data, _cfg(epochs),
                 batch_size=32, eval_batch_size=64, augment=True, normalize=Normalize(data.mean, data.std, "cpu"),
                 sparsifier=sp, seed=0, checkpoint=ckpt, resume=resume, progress=False)


def test_training_lowers_loss_on_synthetic_data():
    data, model, sp = _setup()
    res = _train(data, model, sp, 3, None)
    assert res.history[-1]["train_loss"] < 0.7 * res.history[0]["train_loss"]


def test_resume_is_bit_identical_to_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    data, model_a, sp_a = _setup()
    _train(data, model_a, sp_a, 4, tmp_path / "a.pt")

    data, model_b, sp_b = _setup()
    cfg_stop = _cfg(4)
    # stop right after the 4th checkpoint, in the middle of epoch 2 (8 steps an epoch, one every 3)
    from slimdeploy import train as train_mod

    class Stop(Exception):
        pass

    calls = {"n": 0}
    real_save = train_mod.save_atomic

    def save_then_stop(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == 4:
            assert (obj["epoch"], obj["step"]) == (1, 3)
            raise Stop

    train_mod.save_atomic = save_then_stop
    try:
        with pytest.raises(Stop):
            train(model_b, data, cfg_stop, batch_size=32, eval_batch_size=64, augment=True,
                  normalize=Normalize(data.mean, data.std, "cpu"), sparsifier=sp_b, seed=0,
                  checkpoint=tmp_path / "b.pt", progress=False)
    finally:
        train_mod.save_atomic = real_save

    # a fresh process state: new model, new sparsifier, different global RNG
    data, model_c, sp_c = _setup(seed=123)
    _train(data, model_c, sp_c, 4, tmp_path / "b.pt", resume=True)
    for (k, a), b in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(sp_a.xi, sp_c.xi):
        assert torch.equal(a, b)


def test_checkpoint_atomic_and_corruption(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"x": torch.ones(3)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="ck.pt"):
        load_checkpoint(path)


def test_nan_loss_stops_with_epoch_and_step(tmp_path):
    data, model, sp = _setup()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1"):
        _train(data, model, sp, 1, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()
