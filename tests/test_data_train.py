"""Data sets, batched augmentation, and the training loop's checkpoints and resume."""

import pickle

import numpy as np
import pytest
import torch

from slimdeploy.data import DataError, Normalize, augment, load_cifar, make_synthetic
from slimdeploy.models import build_model
from slimdeploy.recipe import FinetuneCfg
from slimdeploy.sparsity import make_sparsifier
from slimdeploy.train import CheckpointError, TrainingDiverged, load_checkpoint, save_atomic, train


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_synthetic(seed=3, train_size=256, test_size=64), make_synthetic(seed=3, train_size=256, test_size=64)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.dtype == torch.uint8 and a.input_shape == (3, 32, 32)
    assert not torch.equal(a.train.images, make_synthetic(seed=4, train_size=256, test_size=64).train.images)
    assert len(a.train.labels.unique()) == 10


@pytest.mark.parametrize("h, w", [(8, 8), (6, 10)])
def test_augment_is_a_per_image_shifted_crop_or_flip(h, w):
    images = torch.arange(2 * 3 * h * w, dtype=torch.float32).reshape(2, 3, h, w) + 1
    out = augment(images, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, y:y + h, x:x + w] for y in range(5) for x in range(5)]
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
    sp = make_sparsifier(model, "proximal", "tl1", 0.05, a=1.0, beta=10.0)
    return data, model, sp


def _cfg(epochs, precision="fp32"):
    return FinetuneCfg(epochs=epochs, lr=0.05, schedule="multistep", milestones=[0.5], checkpoint_steps=3,
                       precision=precision)


def _train(data, model, sp, epochs, ckpt, resume=False, precision="fp32"):
    return train(model, data, _cfg(epochs, precision),
                 batch_size=32, eval_batch_size=64, augment=True, normalize=Normalize(data.mean, data.std, "cpu"),
                 sparsifier=sp, seed=0, checkpoint=ckpt, resume=resume, progress=False)


@pytest.mark.slow
def test_training_lowers_loss_on_synthetic_data():
    data, model, sp = _setup()
    res = _train(data, model, sp, 3, None)
    assert res.history[-1]["train_loss"] < 0.7 * res.history[0]["train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_identical_to_uninterrupted(tmp_path, precision):
    torch.set_num_threads(1)
    data, model_a, sp_a = _setup()
    _train(data, model_a, sp_a, 4, tmp_path / "a.pt", precision=precision)

    data, model_b, sp_b = _setup()
    cfg_stop = _cfg(4, precision)
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
    _train(data, model_c, sp_c, 4, tmp_path / "b.pt", resume=True, precision=precision)
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


def test_cpu_flags_read_cpuinfo_and_torch(tmp_path, monkeypatch):
    from slimdeploy import train as train_mod

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\nbugs\t\t: spectre_v1\n")
    monkeypatch.setattr(train_mod, "CPUINFO", cpuinfo)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "amx_tile": False, "l2_cache_size": 1})
    assert train_mod.cpu_flags() == {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    monkeypatch.setattr(train_mod, "CPUINFO", tmp_path / "absent")
    assert train_mod.cpu_flags() == {"amx_bf16"}


@pytest.mark.parametrize("flags, expected", [({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                             ({"avx2", "avx512f", "avx512_vnni"}, "fp32"), (set(), "fp32")])
def test_auto_precision_follows_the_cpu_flags(monkeypatch, flags, expected):
    from slimdeploy import train as train_mod

    monkeypatch.setattr(train_mod, "cpu_flags", lambda: flags)
    assert train_mod.resolve_precision("auto", "cpu") == expected
    assert train_mod.resolve_precision("auto", "cuda") == "fp16"
    assert train_mod.resolve_precision("auto", "mps") == "fp32"
    assert [train_mod.resolve_precision(p, "cpu") for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert [train_mod.resolve_precision(p, "cuda") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning():
    from slimdeploy.train import resolve_precision

    with pytest.warns(UserWarning, match="fp16 needs CUDA"):
        assert resolve_precision("fp16", "cpu") == "fp32"


@pytest.mark.parametrize("setting, device, precision, expected", [
    ("auto", "cpu", "fp32", True), ("auto", "cpu", "auto", True), ("auto", "cuda", "auto", True),
    ("auto", "cuda", "bf16", True), ("auto", "cuda", "fp32", False), (False, "cpu", "auto", False),
    (True, "cuda", "fp32", True),
])
def test_channels_last_auto(setting, device, precision, expected):
    from slimdeploy.train import use_channels_last

    assert use_channels_last(setting, device, precision) is expected


def test_precision_and_channels_last_keys():
    from slimdeploy.recipe import RecipeError, build_recipe

    recipe = build_recipe({})
    assert (recipe.train.precision, recipe.finetune.precision, recipe.data.channels_last) == ("auto", "auto", "auto")
    recipe = build_recipe({}, ["train.amp=true", "finetune.precision=bf16", "data.channels_last=false"])
    assert (recipe.train.amp, recipe.train.precision, recipe.finetune.precision) == (True, "auto", "bf16")
    assert recipe.data.channels_last is False
    with pytest.raises(RecipeError, match=r"train\.precision: .*amp"):
        build_recipe({}, ["train.amp=true", "train.precision=fp32"])
    with pytest.raises(RecipeError, match=r"finetune\.precision: .*'auto', 'fp32', 'bf16' or 'fp16'"):
        build_recipe({}, ["finetune.precision=half"])
    with pytest.raises(RecipeError, match=r"data\.channels_last: must be true, false or auto"):
        build_recipe({}, ["data.channels_last=nhwc"])


@pytest.mark.slow
def test_bf16_training_autocasts_while_state_stays_fp32(tmp_path):
    _, model, sp = _setup()
    data = make_synthetic(num_classes=4, image_size=16, train_size=64, test_size=16, seed=0)  # two steps
    model = model.to(memory_format=torch.channels_last)
    seen = []  # (training?, dtype) of the first conv's output
    model.conv1.register_forward_hook(lambda mod, args, out: seen.append((mod.training, out.dtype)))
    res = train(model, data, _cfg(1, "bf16"), batch_size=32, eval_batch_size=64, augment=True,
                normalize=Normalize(data.mean, data.std, "cpu", channels_last=True), sparsifier=sp, seed=0,
                checkpoint=tmp_path / "ck.pt", progress=False)
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}  # evaluation stays fp32
    assert res.precision == "bf16" and [h["precision"] for h in res.history] == ["bf16"]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    state = load_checkpoint(tmp_path / "ck.pt")
    momenta = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert momenta and all(m.dtype == torch.float32 for m in momenta)
    assert all(xi.dtype == torch.float32 for xi in [*sp.xi, *state["sparsifier"]["xi"].values()])
    assert not torch.equal(sp.flat_xi(), sp.flat_gamma())  # ξ moved: the prox ran on fp32 state


def _bn_and_rest(model):
    bn = {n for m_name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
          for n in (f"{m_name}.weight", f"{m_name}.bias")}
    return bn, {n for n, _ in model.named_parameters()} - bn


@pytest.mark.parametrize("extra, bn_lr, bn_wd", [({}, 0.1, 1e-3),
                                                  ({"bn_weight_decay": 0.0, "bn_lr_scale": 0.5}, 0.05, 0.0)])
def test_bn_gamma_and_beta_get_their_own_param_group(extra, bn_lr, bn_wd):
    from slimdeploy.recipe import TrainCfg
    from slimdeploy.train import make_optimizer

    model = build_model("resnet20", 4)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = make_optimizer(model, TrainCfg(lr=0.1, weight_decay=1e-3, **extra)).param_groups
    bn, rest = _bn_and_rest(model)
    assert [{names[id(p)] for p in g["params"]} for g in groups] == [rest, bn]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 1e-3), (bn_lr, bn_wd)]


def test_finetune_cfg_keeps_one_rate_and_decay_for_all():
    from slimdeploy.train import make_optimizer

    groups = make_optimizer(build_model("resnet20", 4), FinetuneCfg(lr=0.02, weight_decay=5e-4)).param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.02, 5e-4), (0.02, 5e-4)]


def test_schedule_scales_the_bn_group_from_its_own_rate():
    from slimdeploy.recipe import TrainCfg
    from slimdeploy.train import TrainState

    model = build_model("resnet20", 4)
    cfg = TrainCfg(lr=0.1, bn_lr_scale=0.5, milestones=[0.5], gamma=0.1, precision="fp32")
    state = TrainState.create(model, cfg, make_sparsifier(model, "none"), total_steps=4, device_type="cpu")
    for _ in range(2):  # half of the 4 steps: past the milestone
        state.optimizer.step()
        state.scheduler.step()
    assert [g["lr"] for g in state.optimizer.param_groups] == pytest.approx([0.01, 0.005])


@pytest.mark.parametrize("method", ["prox_sgd", "proximal"])
def test_prox_step_uses_the_scaled_bn_lr(method):
    from slimdeploy import penalties
    from slimdeploy.recipe import TrainCfg
    from slimdeploy.train import make_optimizer

    model = build_model("resnet20", 4, bn_init=0.5)
    lam, lr, scale, beta = 1.0, 0.4, 0.25, 10.0
    sp = make_sparsifier(model, method, "l1", lam, beta=beta)
    optimizer = make_optimizer(model, TrainCfg(lr=lr, momentum=0.0, bn_weight_decay=0.0, bn_lr_scale=scale))
    sp.attach(optimizer)
    assert sp.gamma_lr() == lr * scale
    optimizer.step()  # no gradients: SGD leaves γ alone, the prox hook alone moves it (or ξ)
    gamma = torch.full_like(sp.flat_gamma(), 0.5)
    if method == "prox_sgd":  # γ ← prox_{lr·λ|·|}(γ)
        expected, moved = penalties.get("l1", lam).prox(gamma, lr * scale), sp.flat_gamma()
    else:  # γ stays at ξ = γ; ξ ← prox_{1/(α+β)}(γ) with α = 1 / lr
        expected, moved = penalties.get("l1", lam).prox(gamma, 1 / (1 / (lr * scale) + beta)), sp.flat_xi()
    assert torch.allclose(moved, expected) and not torch.allclose(moved, gamma)


def test_bn_optimizer_keys_name_the_key():
    from slimdeploy.recipe import RecipeError, build_recipe

    recipe = build_recipe({}, ["train.bn_weight_decay=0", "train.bn_lr_scale=2"])
    assert (recipe.train.bn_weight_decay, recipe.train.bn_lr_scale) == (0.0, 2.0)
    assert build_recipe({}).train.bn_weight_decay is None and build_recipe({}).train.bn_lr_scale == 1.0
    for setting, key in [("train.bn_weight_decay=-1e-4", r"train\.bn_weight_decay: "),
                         ("train.bn_lr_scale=0", r"train\.bn_lr_scale: "),
                         ("train.bn_lr_scale=.inf", r"train\.bn_lr_scale: "),
                         ("finetune.bn_lr_scale=2", r"finetune\.bn_lr_scale: unknown key")]:
        with pytest.raises(RecipeError, match=key):
            build_recipe({}, [setting])
