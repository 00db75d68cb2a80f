"""Static INT8 export: types per target CPU, calibration methods, and the report's int8 block."""

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from helpers import FAST, QUICKSTART, run_cli
from slimdeploy import pipeline, runtimes
from slimdeploy.data import Normalize, make_synthetic
from slimdeploy.export import (
    CALIBRATION_METHODS, export_onnx, int8_metadata, int8_types, quantize_int8, resolve_int8_target,
)
from slimdeploy.recipe import RecipeError, build_recipe
from slimdeploy.results import RunReport

SHAPE = (3, 16, 16)


class TinyCNN(nn.Module):
    """Conv + BN + ReLU, a residual block, global pooling and a linear head."""

    def __init__(self, classes: int = 4, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TinyCNN trained briefly on a synthetic set (so its logits separate the classes), exported to ONNX."""
    torch.manual_seed(0)
    data = make_synthetic(num_classes=4, image_size=SHAPE[1], train_size=512, test_size=300, seed=0)
    normalize = Normalize(data.mean, data.std, "cpu")
    net = TinyCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = normalize(data.train.images), data.train.labels
    for step in range(60):
        idx = torch.arange(step * 64, step * 64 + 64) % len(y)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert (net(normalize(data.test.images)).argmax(1) == data.test.labels).float().mean() > 0.6
    path = export_onnx(net, tmp_path_factory.mktemp("int8") / "tiny.onnx", SHAPE)
    return net, path, data, normalize


def _calibration(trained, n=64):
    _, _, data, normalize = trained
    return normalize(data.train.images[:n]).numpy()


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _zero_point_types(path) -> tuple[set, set]:
    """Element types of the zero points of activation QuantizeLinear nodes and of weight DequantizeLinear nodes."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def dtype(name):
        return onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type)

    activations = {dtype(n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear"}
    weights = set()
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            dq = producer[node.input[1]]
            assert dq.op_type == "DequantizeLinear" and dq.input[0] in inits, node.name
            weights.add(dtype(dq.input[2]))
    return activations, weights


def _max_abs_weight(path) -> int:
    """Largest |quantized value| among the 8-bit weight initializers."""
    graph = onnx.load(str(path)).graph
    return max(int(np.abs(numpy_helper.to_array(i).astype(np.int32)).max()) for i in graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1)


@pytest.mark.slow
def test_quantized_model_runs_in_onnxruntime(trained, tmp_path):
    _, path, _, _ = trained
    calib = _calibration(trained)
    qpath = quantize_int8(path, tmp_path / "tiny.int8.onnx", calib)
    ops = {n.op_type for n in onnx.load(str(qpath)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    yq = _run(qpath, calib[:5])
    assert yq.shape == (5, 4) and np.isfinite(yq).all()


@pytest.mark.slow
@pytest.mark.parametrize("target, activation, weights", [("x86", np.uint8, np.int8), ("arm", np.int8, np.int8)])
def test_zero_point_types_follow_the_target(trained, tmp_path, target, activation, weights):
    _, path, _, _ = trained
    qpath = quantize_int8(path, tmp_path / f"{target}.onnx", _calibration(trained), **int8_types(target))
    assert _zero_point_types(qpath) == ({np.dtype(activation)}, {np.dtype(weights)})
    recorded = int8_metadata(qpath)
    assert (recorded["activation"], recorded["weights"]) == (np.dtype(activation).name, np.dtype(weights).name)


@pytest.mark.slow
def test_reduce_range_without_vnni_keeps_weights_to_7_bits(trained, tmp_path):
    _, path, _, _ = trained
    calib = _calibration(trained, 16)
    no_vnni, vnni = int8_types("x86", vnni=False), int8_types("x86", vnni=True)
    assert no_vnni["reduce_range"] and not vnni["reduce_range"]
    assert not int8_types("arm")["reduce_range"]
    narrow = quantize_int8(path, tmp_path / "narrow.onnx", calib, **no_vnni)
    full = quantize_int8(path, tmp_path / "full.onnx", calib, **vnni)
    assert _max_abs_weight(narrow) <= 64 < _max_abs_weight(full)
    assert int8_metadata(narrow)["reduce_range"] is True and int8_metadata(full)["reduce_range"] is False


@pytest.mark.slow
@pytest.mark.parametrize("target, method", [*(("x86", m) for m in CALIBRATION_METHODS),
                                            ("arm", "minmax"), ("arm", "percentile")])  # entropy is slow
def test_each_calibration_method_stays_close_to_fp32(trained, tmp_path, target, method):
    _, path, data, normalize = trained
    qpath = quantize_int8(path, tmp_path / f"{method}.onnx", _calibration(trained), method=method,
                          **int8_types(target))
    x = normalize(data.test.images).numpy()
    yf, yq = _run(path, x), _run(qpath, x)
    agreement = (yf.argmax(1) == yq.argmax(1)).mean()
    relative_rms = np.sqrt(((yq - yf) ** 2).mean() / (yf**2).mean())
    assert agreement >= 0.95 and relative_rms < 0.15, (agreement, relative_rms)
    recorded = int8_metadata(qpath)
    assert recorded["calibration"] == method and recorded["calibration_images"] == 64


def _input_scale(path) -> float:
    """Scale of the QuantizeLinear that reads the graph input."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    (node,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == graph.input[0].name]
    return float(inits[node.input[1]])


@pytest.mark.slow
def test_histogram_methods_clip_an_outlier_minmax_keeps(trained, tmp_path):
    _, path, _, _ = trained
    calib = _calibration(trained, 256)
    calib[0, 0, 0, 0] = 1000.0  # one outlier pixel (below the 99.999th percentile's share): MinMax spans it
    scales = {m: _input_scale(quantize_int8(path, tmp_path / f"{m}.onnx", calib, method=m))
              for m in CALIBRATION_METHODS}
    assert scales["percentile"] < scales["minmax"] / 5
    assert scales["entropy"] < scales["minmax"] / 5


@pytest.mark.slow
def test_bad_quantize_arguments_name_the_argument(trained, tmp_path):
    _, path, _, _ = trained
    for kwargs, word in [({"activation": "int4"}, "activation"), ({"weights": "uint16"}, "weights"),
                         ({"method": "kl"}, "calibration method")]:
        with pytest.raises(ValueError, match=word):
            quantize_int8(path, tmp_path / "bad.onnx", _calibration(trained, 4), **kwargs)
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("machine, target", [("x86_64", "x86"), ("AMD64", "x86"), ("aarch64", "arm"),
                                             ("arm64", "arm"), ("armv7l", "arm")])
def test_auto_target_follows_the_machine(machine, target):
    assert resolve_int8_target("auto", machine=machine) == target
    assert resolve_int8_target(target, machine="riscv64") == target


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="int8 target"):
        int8_types("mips")


@pytest.mark.parametrize("override, key", [
    ("export.int8_target=mips", "export.int8_target"),
    ("export.int8_calibration=kl", "export.int8_calibration"),
    ("export.int8_calibration_images=0", "export.int8_calibration_images"),
])
def test_recipe_refuses_bad_int8_keys(override, key):
    with pytest.raises(RecipeError) as err:
        build_recipe({}, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_recipe_int8_keys_reach_the_config():
    cfg = build_recipe({}, ["export.int8_target=arm", "export.int8_calibration=entropy",
                            "export.int8_calibration_images=32"]).export
    assert (cfg.int8_target, cfg.int8_calibration, cfg.int8_calibration_images) == ("arm", "entropy", 32)


@pytest.mark.slow
def test_int8_stage_reports_types_accuracy_and_speedup(trained, tmp_path):
    net, path, data, normalize = trained
    for name in ("dense", "pruned"):
        export_onnx(net, tmp_path / f"{name}.onnx", SHAPE)
    recipe = build_recipe({}, ["export.int8_target=arm", "export.int8_calibration=percentile",
                               "export.int8_calibration_images=48", "bench.iters=3", "bench.warmup=0",
                               "bench.settings=[{batch: 2, threads: 1}]"])
    ctx = pipeline.RunContext(recipe, pipeline.RunDir(tmp_path), data, normalize, progress=False)
    q = json.loads(json.dumps(pipeline.int8_stage(ctx, pipeline.ModelPair(net, net), {}).to_json()))

    assert (q["target"], q["activation"], q["weights"]) == ("arm", "int8", "int8")
    assert (q["calibration"], q["calibration_images"]) == ("percentile", 48)
    # FP32 accuracy over the whole test split (300 images: not a multiple of the batch of 256)
    expected = 100.0 * (_run(path, normalize(data.test.images).numpy()).argmax(1) == data.test.labels.numpy()).mean()
    for name in ("dense", "pruned"):
        side = q[name]
        assert side["fp32_accuracy"] == pytest.approx(expected, abs=1e-9)
        assert side["fp32_accuracy"] - 3 <= side["accuracy"] <= 100
        assert int8_metadata(side["onnx"])["calibration"] == "percentile"
        assert side["accuracy_by_runtime"] == {}  # onnxruntime alone
    (row,) = q["latency"]
    assert row["backend"] == "onnxruntime" and row["session"]["intra_op_spinning"] is False  # timed interleaved
    assert (row["session"]["precision"], row["session"]["float_precision"]) == ("int8", "f32")
    for name in ("dense", "pruned"):
        assert row["speedup_vs_fp32"][name] == pytest.approx(row[f"{name}_fp32"]["p50"] / row[name]["p50"])


def test_onnxruntime_models_timed_together_do_not_spin(tmp_path):
    path = export_onnx(TinyCNN().eval(), tmp_path / "tiny.onnx", SHAPE)
    together = runtimes.load_interleaved("onnxruntime", [path, path], threads=1)
    (alone,) = runtimes.load_interleaved("onnxruntime", [path], threads=1)
    assert [model.describe()["intra_op_spinning"] for model in together] == [False, False]
    assert alone.describe()["intra_op_spinning"] is True


@pytest.mark.slow
def test_executorch_gets_an_int8_program_of_its_own(trained, tmp_path):
    pytest.importorskip("executorch.runtime", reason="executorch is not installed (pip install -e .[executorch])")
    net, path, data, normalize = trained
    models = pipeline.ModelPair(net, net)
    fp32 = [runtimes.prepare("executorch", net, export_onnx(net, tmp_path / f"{name}.onnx", SHAPE), SHAPE, 2)
            for name in ("dense", "pruned")]
    recipe = build_recipe({}, ["export.int8_calibration_images=32", "bench.iters=3", "bench.warmup=0",
                               "bench.settings=[{batch: 2, threads: 1}]", "bench.runtimes=[executorch, onnxruntime]"])
    ctx = pipeline.RunContext(recipe, pipeline.RunDir(tmp_path), data, normalize, progress=False)
    q = pipeline.int8_stage(ctx, models, {"executorch": fp32})

    assert (tmp_path / "dense.int8.pte").is_file() and (tmp_path / "pruned.int8.pte").is_file()
    assert [row.backend for row in q.latency] == ["executorch", "onnxruntime"]
    et = q.latency[0]
    assert et.session["runtime"] == "executorch" and np.isfinite([et.dense.p50, et.pruned.p50]).all()
    for side in (q.dense, q.pruned):  # XNNPACK's INT8 program keeps about the accuracy of the FP32 file
        assert set(side.accuracy_by_runtime) == {"executorch"}
        assert abs(side.accuracy_by_runtime["executorch"] - side.fp32_accuracy) <= 5


@pytest.mark.slow
def test_int8_rows_and_accuracy_for_onnxruntime_and_openvino(tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")
    out = tmp_path / "run"
    res = run_cli(QUICKSTART, *FAST, "bench.torch=false", "bench.runtimes=[onnxruntime, openvino]", out=out,
                  args=["--export", "onnx-int8"])
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    q = report["int8"]
    settings = [(row["batch"], row["threads"]) for row in report["latency"] if row["backend"] == "onnxruntime"]
    rows = {(row["backend"], row["batch"], row["threads"]): row for row in q["latency"]}
    assert len(settings) == 2 and len(q["latency"]) == 4
    assert set(rows) == {(backend, *setting) for backend in ("onnxruntime", "openvino") for setting in settings}
    for (backend, *_), row in rows.items():
        for model in ("dense", "pruned", "dense_fp32", "pruned_fp32"):
            assert math.isfinite(row[model]["p50"]) and row[model]["p50"] > 0, (backend, model)
        assert row["session"]["runtime"] == backend
    for batch, threads in settings:
        assert rows[("onnxruntime", batch, threads)]["session"]["intra_op_spinning"] is False
        assert rows[("openvino", batch, threads)]["session"]["threads"] == threads
    for side in ("dense", "pruned"):  # the same INT8 file in two runtimes: the same predictions, nearly
        assert set(q[side]["accuracy_by_runtime"]) == {"openvino"}
        assert q[side]["accuracy_by_runtime"]["openvino"] == pytest.approx(q[side]["accuracy"], abs=3)
    md = (out / "report.md").read_text()
    assert "| openvino p50 (ms) INT8 / FP32, batch 1, 1 thread(s) |" in md
    assert "| top-1 accuracy (%), INT8 in openvino |" in md
    assert RunReport.from_json(out / "report.json").to_json() == report
