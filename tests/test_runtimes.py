"""Runtimes beside onnxruntime: OpenVINO's output checked against PyTorch, its description, recipe keys,
and its verified latency rows in an in-process run."""

import numpy as np
import onnx
import pytest
import torch

from helpers import tiny_recipe
from slimdeploy import pipeline, runtimes
from slimdeploy.export import ExportError, ExportMismatchError, export_onnx
from slimdeploy.models import build_model
from slimdeploy.ortbench import SessionConfig
from slimdeploy.recipe import RecipeError, build_recipe

SHAPE = (3, 32, 32)


@pytest.fixture
def openvino():
    return pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")


@pytest.fixture
def resnet20(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    return model, export_onnx(model, tmp_path / "resnet20.onnx", SHAPE)


def test_openvino_matches_pytorch(openvino, resnet20):
    model, path = resnet20
    x = torch.randn(8, *SHAPE)
    loaded = runtimes.OpenVino.load(path, threads=1)
    # the plugin computes in bf16 where the CPU has it natively, and is held to that precision's tolerance
    allowed = runtimes.tolerance_for(loaded.describe()["precision"], 1e-4)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(loaded.run(x.numpy()), expected, rtol=0, atol=allowed * np.abs(expected).max())
    check = runtimes.verify(loaded, model, x, tolerance=1e-4)
    assert check["runtime"] == "openvino" and check["tolerance"] == allowed
    assert 0 <= check["max_abs_diff"] <= allowed * check["max_abs_logit"]


def test_openvino_describes_precision_threads_and_hint(openvino, resnet20):
    info = runtimes.OpenVino.load(resnet20[1], threads=1).describe()
    assert info["precision"] in runtimes.PRECISION_TOLERANCE
    caps = torch.cpu.get_capabilities()
    if not (caps.get("avx512_bf16") or caps.get("amx_bf16")):  # no native bf16: OpenVINO computes in f32
        assert info["precision"] == "f32"
    assert info["threads"] == 1 and info["performance_hint"] == "LATENCY" and info["cpu_pinning"] is False
    assert info["version"] == openvino.get_version() and info["device"].startswith("CPU")


def test_tampered_weight_fails_verification(openvino, resnet20, tmp_path):
    model, path = resnet20
    proto = onnx.load(str(path))
    weight = next(init for init in proto.graph.initializer if len(init.dims) == 4)  # a folded conv weight
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(proto, str(tmp_path / "tampered.onnx"))
    loaded = runtimes.OpenVino.load(tmp_path / "tampered.onnx", threads=1)
    precision = loaded.describe()["precision"]
    with pytest.raises(ExportMismatchError, match=rf"max \|openvino \({precision}\) - PyTorch\|") as err:
        runtimes.verify(loaded, model, torch.randn(4, *SHAPE), tolerance=1e-4)
    assert "\n" not in str(err.value) and "tampered.onnx" in str(err.value)


def test_onnxruntime_runs_in_its_session_config(resnet20, tmp_path):
    model, path = resnet20
    config = SessionConfig(threads=2, spinning=False, opt_level="basic")
    check = runtimes.verify(runtimes.OnnxRuntime(path, config), model, torch.randn(2, *SHAPE), tolerance=1e-4)
    assert {k: check[k] for k in config.describe()} == config.describe() and check["precision"] == "f32"
    assert runtimes.OnnxRuntime.load(path, 1, spinning=False).config == SessionConfig(threads=1, spinning=False)
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ExportError, match="bad.onnx: onnxruntime cannot load the model") as err:
        runtimes.OnnxRuntime.load(tmp_path / "bad.onnx", 1)
    assert "\n" not in str(err.value)


class _Shifted:
    """A stand-in runtime whose logits are off by ``shift`` x max |logit| in the given precision."""

    name, path = "fake", "fake.onnx"

    def __init__(self, model, precision, shift):
        self.model, self.precision, self.shift = model, precision, shift

    def run(self, inputs):
        with torch.no_grad():
            logits = self.model(torch.from_numpy(inputs)).numpy()
        return logits + self.shift * np.abs(logits).max()

    def describe(self):
        return {"runtime": self.name, "precision": self.precision}


def test_tolerance_follows_the_precision_used():
    torch.manual_seed(0)
    model, x = build_model("resnet20", 10).eval(), torch.randn(2, *SHAPE)
    assert runtimes.verify(_Shifted(model, "bf16", 1e-2), model, x, 1e-4)["tolerance"] == 2e-2
    with pytest.raises(ExportMismatchError, match=r"fake \(bf16\)"):
        runtimes.verify(_Shifted(model, "bf16", 3e-2), model, x, 1e-4)
    with pytest.raises(ExportMismatchError, match=r"fake \(f32\)"):
        runtimes.verify(_Shifted(model, "f32", 1e-3), model, x, 1e-4)
    assert runtimes.tolerance_for("f32", 1e-4) == 1e-4 and runtimes.tolerance_for("bf16", 0.1) == 0.1


def test_recipe_runtimes_default_and_errors(monkeypatch):
    assert build_recipe({}).bench.runtimes == ["onnxruntime"]
    with pytest.raises(RecipeError) as err:
        build_recipe({"bench": {"runtimes": ["onnxruntime", "tensorrt"]}})
    assert "bench.runtimes: unknown runtime 'tensorrt'; allowed: onnxruntime, openvino, executorch" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="bench.runtimes: must not repeat"):
        build_recipe({"bench": {"runtimes": ["onnxruntime", "onnxruntime"]}})
    monkeypatch.setattr(runtimes.OpenVino, "available", staticmethod(lambda: False))
    with pytest.raises(RecipeError, match="bench.runtimes: openvino is not installed; pip install openvino"):
        build_recipe({"bench": {"runtimes": ["openvino"]}})


def test_time_models_interleaves_runtimes(openvino, resnet20):
    loaded = [runtimes.OnnxRuntime.load(resnet20[1], 1, spinning=False), runtimes.OpenVino.load(resnet20[1], 1)]
    stats = runtimes.time_models(loaded, SHAPE, batch=2, warmup=1, iters=5, threads=1)
    assert len(stats) == 2
    for s in stats:
        assert s.batch == 2 and s.threads == 1 and 0 < s.p50 <= s.p90 <= s.p99


@pytest.mark.slow
def test_pipeline_reports_verified_openvino_rows(openvino, tmp_path):
    recipe = build_recipe(tiny_recipe(
        data={"train_size": 32, "test_size": 32, "eval_batch_size": 32},
        bench={"iters": 2, "runtimes": ["onnxruntime", "openvino"],
               "settings": [{"batch": 1, "threads": 1}, {"batch": 4, "threads": 2}]},
    ))
    report = pipeline.run(recipe, tmp_path, export_format="onnx", progress=False).report
    check = report["runtimes"]["openvino"]
    assert check["precision"] in runtimes.PRECISION_TOLERANCE and check["threads"] >= 1
    assert check["max_abs_diff"] <= check["tolerance"] * check["max_abs_logit"]
    assert check["dense_max_abs_diff"] <= check["tolerance"] * check["dense_max_abs_logit"]
    rows = {backend: [r for r in report["latency"] if r["backend"] == backend]
            for backend in ("onnxruntime", "openvino")}
    assert [(r["batch"], r["threads"]) for r in rows["openvino"]] == [(1, 1), (4, 2)]
    for ort_row, ov_row in zip(rows["onnxruntime"], rows["openvino"]):
        assert set(ov_row) == set(ort_row)
        assert set(ov_row["pruned"]) == set(ort_row["pruned"]) and ov_row["pruned"]["batch"] == ort_row["batch"]
        assert ov_row["session"]["threads"] == ov_row["threads"] and ov_row["session"]["runtime"] == "openvino"
    assert "| openvino p50" in (tmp_path / "report.md").read_text()

