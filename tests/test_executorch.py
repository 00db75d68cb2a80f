"""The ExecuTorch runtime: .pte programs exported beside the ONNX files, checked against PyTorch for a
dense and a pruned model, its description and thread pool, and the one-line errors (the missing-install
ones run without the executorch extra)."""

import contextlib
import copy
import importlib.util
import types

import numpy as np
import pytest
import torch
from torch import nn

import slimdeploy as sd
from helpers import tiny_recipe, trained_like
from slimdeploy import executorch_export, pipeline, runtimes
from slimdeploy.bench import count_params
from slimdeploy.data import Normalize, make_synthetic
from slimdeploy.export import ExportError, ExportMismatchError, export_onnx
from slimdeploy.models import build_model
from slimdeploy.recipe import RecipeError, build_recipe

SHAPE = (3, 16, 16)
MAX_BATCH = 17  # past 16, where lowering without the size-oblivious patch caps the batch at 15


@pytest.fixture(scope="module")
def executorch():
    return pytest.importorskip("executorch", reason="the executorch extra is not installed")


class TinyResidual(nn.Module):
    def __init__(self, c=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.body(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def programs(executorch, tmp_path_factory):
    """name -> (model, .pte path) for a dense model and its pruned copy, each exported by `prepare` over
    a stale file at the same path."""
    torch.manual_seed(0)
    dense = trained_like(TinyResidual())
    pruned, _ = sd.prune(dense, torch.randn(8, *SHAPE), amount=0.5)
    assert count_params(pruned) < count_params(dense)
    out = tmp_path_factory.mktemp("executorch")
    result = {}
    for name, model in (("dense", dense), ("pruned", pruned.eval())):
        (out / f"{name}.pte").write_bytes(b"stale")
        result[name] = model, runtimes.prepare("executorch", model, out / f"{name}.onnx", SHAPE, MAX_BATCH)
    return result


def test_prepare_writes_a_fresh_program_beside_the_onnx_file(programs):
    for name, (_, path) in programs.items():
        assert path.name == f"{name}.pte" and path.read_bytes() != b"stale"
        assert sorted(p.name for p in path.parent.iterdir()) == ["dense.pte", "pruned.pte"]  # no temp files


@pytest.mark.parametrize("name", ["dense", "pruned"])
def test_program_matches_pytorch_at_batch_1_and_its_max(programs, name):
    model, path = programs[name]
    loaded = runtimes.ExecuTorch.load(path, threads=1)
    for batch in (1, MAX_BATCH):
        x = torch.randn(batch, *SHAPE)
        with torch.no_grad():
            expected = model(x).numpy()
        got = loaded.run(x.numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
        check = runtimes.verify(loaded, model, x, tolerance=1e-4)
        assert check["runtime"] == "executorch" and check["tolerance"] == 1e-4


def test_verify_catches_a_model_the_program_was_not_exported_from(programs):
    model, path = programs["dense"]
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.weight.mul_(1.5)
    with pytest.raises(ExportMismatchError, match=r"dense.pte: max \|executorch \(f32\) - PyTorch\|") as err:
        runtimes.verify(runtimes.ExecuTorch.load(path, threads=1), changed, torch.randn(4, *SHAPE), 1e-4)
    assert "\n" not in str(err.value)


def test_describe_records_version_threads_and_batch(executorch, programs):
    from executorch.version import __version__

    path = programs["dense"][1]
    for threads in (2, 1):
        info = runtimes.ExecuTorch.load(path, threads=threads).describe()
        assert info["threads"] == threads and info["max_batch"] == MAX_BATCH
        assert info["runtime"] == "executorch" and info["version"] == __version__
        assert info["precision"] == "f32" and info["device"].startswith("CPU")
        assert "per process" in info["threadpool"]


def test_a_program_loaded_before_the_pool_was_resized_refuses_to_run(programs):
    path, x = programs["dense"][1], np.zeros((1, *SHAPE), np.float32)
    first = runtimes.ExecuTorch.load(path, threads=2)
    second = runtimes.ExecuTorch.load(path, threads=1)
    runtimes.ExecuTorch.load(path, threads=1)  # the same size keeps the pool, and the programs on it
    assert second.run(x).shape == (1, 10)
    with pytest.raises(ExportError, match="thread pool was resized after this program was loaded; load it again"):
        first.run(x)


def test_time_models_interleaves_executorch_with_onnxruntime(programs, tmp_path):
    model, path = programs["pruned"]
    onnx_path = export_onnx(model, tmp_path / "pruned.onnx", SHAPE)
    loaded = [runtimes.OnnxRuntime.load(onnx_path, 1, spinning=False), runtimes.ExecuTorch.load(path, 1)]
    stats = runtimes.time_models(loaded, SHAPE, batch=2, warmup=1, iters=5, threads=1)
    assert len(stats) == 2
    for s in stats:
        assert s.batch == 2 and s.threads == 1 and 0 < s.p50 <= s.p90 <= s.p99


def test_batch_beyond_the_program_is_one_line(programs):
    loaded = runtimes.ExecuTorch.load(programs["dense"][1], threads=1)
    with pytest.raises(ExportError, match=f"dense.pte: batch {MAX_BATCH + 1} exceeds the {MAX_BATCH}"):
        loaded.run(np.zeros((MAX_BATCH + 1, *SHAPE), np.float32))


def test_unreadable_program_is_one_line(executorch, tmp_path):
    (tmp_path / "bad.pte").write_bytes(b"not a program")
    with pytest.raises(ExportError, match="bad.pte: ExecuTorch cannot load the program") as err:
        runtimes.ExecuTorch.load(tmp_path / "bad.pte", threads=1)
    assert "\n" not in str(err.value)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_model_torch_export_cannot_trace_is_one_line(executorch, tmp_path):
    with pytest.raises(ExportError, match=r"DataDependent \(input 3x16x16\) -> bad.pte: ExecuTorch export failed"
                       ) as err:
        executorch_export.export_pte(DataDependent(), tmp_path / "bad.pte", SHAPE, max_batch=2)
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_a_program_planned_below_the_batch_asked_for_is_refused(executorch, tmp_path, monkeypatch):
    # without the size-oblivious patch, lowering caps the batch below 16
    unpatched = types.SimpleNamespace(patch=lambda **_: contextlib.nullcontext())
    monkeypatch.setattr(executorch_export, "fx_config", unpatched)
    with pytest.raises(ExportError, match=f"small.pte: the ExecuTorch program takes batches up to 15, not the "
                       f"{MAX_BATCH} asked for"):
        executorch_export.export_pte(TinyResidual().eval(), tmp_path / "small.pte", SHAPE, MAX_BATCH)
    assert not (tmp_path / "small.pte").exists()


INT8_SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def int8_programs(executorch, tmp_path_factory):
    """A ResNet-20 trained briefly on synthetic 8 px images (a random one predicts the same class for
    every input, so top-1 agreement would test nothing), in channels_last as the pipeline trains it;
    its test and calibration images, and its FP32 and INT8 programs."""
    torch.manual_seed(0)
    data = make_synthetic(num_classes=10, image_size=INT8_SHAPE[1], train_size=256, test_size=128, seed=0)
    normalize = Normalize(data.mean, data.std, "cpu", channels_last=True)
    model, train_images = build_model("resnet20", 10), normalize(data.train.images)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        for x, y in zip(train_images.split(32), data.train.labels.split(32)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model = model.eval().to(memory_format=torch.channels_last)
    test_images = normalize(data.test.images)
    with torch.no_grad():
        predicted = model(test_images).argmax(1)
    assert (predicted == data.test.labels).float().mean() > 0.6 and predicted.unique().numel() >= 5
    out = tmp_path_factory.mktemp("int8")
    calibration = train_images[:64]  # 17 + 17 + 17 + 13: calibrated in batches the program takes
    fp32 = executorch_export.export_pte(model, out / "fp32.pte", INT8_SHAPE, MAX_BATCH)
    int8 = executorch_export.export_pte_int8(model, out / "int8.pte", INT8_SHAPE, MAX_BATCH, calibration)
    return model, test_images, calibration, fp32, int8


def _run_in_batches(loaded, images: torch.Tensor) -> np.ndarray:
    return np.concatenate([loaded.run(x.contiguous().numpy()) for x in images.split(loaded.max_batch)])


def _agreement_and_error(model, path, images) -> tuple[float, float]:
    """Top-1 agreement of the program with `model`, and its max |logit error| / max |logit|."""
    with torch.no_grad():
        expected = model(images).numpy()
    got = _run_in_batches(runtimes.ExecuTorch.load(path, threads=1), images)
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    return agreement, float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.slow
def test_int8_program_agrees_with_the_float_model(int8_programs):
    model, images, _, _, int8 = int8_programs
    agreement, error = _agreement_and_error(model, int8, images)
    assert agreement >= 0.9 and error <= 0.1
    assert error > 1e-4  # computed in INT8, not float32
    loaded = runtimes.ExecuTorch.load(int8, threads=1)
    assert loaded.max_batch == MAX_BATCH
    np.testing.assert_allclose(loaded.run(images[:1].contiguous().numpy()), _run_in_batches(loaded, images)[:1],
                               rtol=0, atol=1e-5)  # batch 1 computes what a full batch does


@pytest.mark.slow
def test_int8_program_is_under_half_the_float_one(int8_programs):
    *_, fp32, int8 = int8_programs
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert sorted(p.name for p in int8.parent.iterdir()) == ["fp32.pte", "int8.pte"]  # no temp files


@pytest.mark.slow
def test_int8_activation_ranges_come_from_the_calibration_images(int8_programs, tmp_path):
    # calibrated on images 20x too faint, the activation ranges clip the real inputs
    model, images, calibration, _, _ = int8_programs
    narrow = executorch_export.export_pte_int8(model, tmp_path / "narrow.pte", INT8_SHAPE, MAX_BATCH,
                                               calibration * 0.05)
    agreement, error = _agreement_and_error(model, narrow, images)
    assert agreement < 0.5 and error > 0.5


@pytest.mark.parametrize("calibration, got", [
    (torch.randn(4, 3, 8, 8), "torch.float32 (4, 3, 8, 8)"),
    (torch.zeros(0, *SHAPE), "torch.float32 (0, 3, 16, 16)"),
    (torch.zeros(4, *SHAPE, dtype=torch.uint8), "torch.uint8 (4, 3, 16, 16)"),
])
def test_bad_calibration_is_one_line(tmp_path, calibration, got):
    with pytest.raises(ValueError) as err:
        executorch_export.export_pte_int8(TinyResidual().eval(), tmp_path / "q.pte", SHAPE, 4, calibration)
    assert str(err.value) == f"calibration must be a float tensor of shape (N, 3, 16, 16) with N >= 1, got {got}"
    assert not list(tmp_path.iterdir())


def test_model_int8_export_cannot_trace_is_one_line(executorch, tmp_path):
    with pytest.raises(ExportError, match=r"DataDependent \(input 3x16x16\) -> bad.pte: ExecuTorch INT8 export "
                       r"failed") as err:
        executorch_export.export_pte_int8(DataDependent(), tmp_path / "bad.pte", SHAPE, 2, torch.randn(4, *SHAPE))
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_onnx_runtimes_load_the_onnx_file_itself(tmp_path):
    for name in ("onnxruntime", "openvino"):
        assert runtimes.prepare(name, nn.Identity(), tmp_path / "m.onnx", SHAPE, 64) == tmp_path / "m.onnx"
    assert not list(tmp_path.iterdir())


def _executorch_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "executorch" else real(name, *args))


def test_recipe_asking_for_a_missing_executorch_fails_in_one_line(monkeypatch):
    _executorch_missing(monkeypatch)
    assert not runtimes.ExecuTorch.available()
    with pytest.raises(RecipeError) as err:
        build_recipe({"bench": {"runtimes": ["onnxruntime", "executorch"]}})
    assert "bench.runtimes: executorch is not installed; pip install -e .[executorch]" in str(err.value)
    assert "\n" not in str(err.value)


def test_recipe_accepts_executorch_when_installed(monkeypatch):
    monkeypatch.setattr(runtimes.ExecuTorch, "available", staticmethod(lambda: True))
    assert build_recipe({"bench": {"runtimes": ["onnxruntime", "executorch"]}}).bench.runtimes == [
        "onnxruntime", "executorch"]


@pytest.mark.slow
def test_pipeline_verifies_and_times_channels_last_models_in_executorch(executorch, tmp_path):
    # On the CPU the pipeline trains in channels_last, which XNNPACK's lowering does not take as is.
    recipe = build_recipe(tiny_recipe(data={"channels_last": True},
                                      bench={"runtimes": ["onnxruntime", "executorch"], "iters": 2}))
    report = pipeline.run(recipe, tmp_path, export_format="onnx", progress=False).report
    assert (tmp_path / "dense.pte").is_file() and (tmp_path / "pruned.pte").is_file()
    check = report["runtimes"]["executorch"]
    assert check["max_abs_diff"] <= recipe.export.tolerance * check["max_abs_logit"]
    assert [row["backend"] for row in report["latency"]] == ["onnxruntime", "executorch"]
