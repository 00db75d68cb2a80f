"""ONNX export: dynamic batch, verification against PyTorch in onnxruntime, negligible weights zeroed."""

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from slimdeploy import export
from slimdeploy.export import NEGLIGIBLE, VERIFY_SESSION, ExportMismatchError, export_onnx, verify_onnx
from slimdeploy.ortbench import SessionConfig, input_shape_for

SHAPE = (3, 16, 16)


class TinyNet(nn.Module):
    """Conv + BN, a residual add and a channel concatenation."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.side = nn.Conv2d(width, width // 2, 1)
        self.head = nn.Linear(width + width // 2, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        x = torch.cat([x, self.side(x)], dim=1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make_net(width: int = 8, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet(width)
    for m in net.modules():  # non-trivial BN statistics, so folding is actually exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    net = make_net()
    net.train()
    path = export_onnx(net, d / "tiny.onnx", SHAPE)
    return net, path


def test_export_restores_mode_and_verifies(exported):
    net, path = exported
    assert net.training and all(m.training for m in net.modules())
    onnx.checker.check_model(str(path))
    check = verify_onnx(net, path, torch.randn(4, *SHAPE))
    assert check.opset == 17
    assert check.max_abs_logit > 0
    assert check.max_abs_diff <= 1e-4 * check.max_abs_logit
    assert not any(p.name.endswith(".tmp.onnx") for p in path.parent.iterdir())


def test_io_names_and_dynamic_batch(exported):
    net, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    net.eval()
    for batch in (1, 5):
        x = torch.randn(batch, *SHAPE)
        (y,) = sess.run(None, {"input": x.numpy()})
        assert y.shape == (batch, 10)
        with torch.no_grad():
            np.testing.assert_allclose(y, net(x).numpy(), rtol=1e-4, atol=1e-5)
    net.train()
    assert input_shape_for(sess, 7) == (7, *SHAPE)


def test_negligible_weights_are_zeroed(tmp_path):
    # γ driven to ~0 by sparse training folds into filters of subnormal-scale weights.
    net = make_net()
    bn = net.stem[1]
    bn.weight.data[:3] = torch.tensor([1e-30, 1e-40, -1e-25])
    bn.bias.data[:3] = torch.tensor([1e-33, 0.0, 0.1])
    path = export_onnx(net, tmp_path / "tiny.onnx", SHAPE)
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    floats = np.concatenate([w.ravel() for w in weights if w.dtype == np.float32])
    assert not ((floats != 0) & (np.abs(floats) < NEGLIGIBLE)).any()
    assert (floats == 0).sum() >= 3 * 3 * 3 * 3  # the three filters fed by those γ, at least
    check = verify_onnx(net, path, torch.randn(8, *SHAPE))
    assert check.max_abs_diff <= 1e-5 * check.max_abs_logit


def test_model_changed_after_export_is_caught(exported, tmp_path):
    net, path = exported
    other = make_net(seed=1)
    with pytest.raises(ExportMismatchError) as err:
        verify_onnx(other, path, torch.randn(2, *SHAPE))
    msg = str(err.value)
    assert str(path) in msg
    assert len(re.findall(r"\d\.\d+e[+-]\d+", msg)) >= 2  # the difference and max |logit|


def test_tampered_onnx_is_caught(exported, tmp_path):
    net, path = exported
    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ExportMismatchError, match="tampered.onnx"):
        verify_onnx(net, bad, torch.randn(2, *SHAPE))


def test_verification_runs_in_the_given_session_and_records_it(exported, monkeypatch):
    net, path = exported
    used = []

    def spy(model, config):
        used.append(config)
        return make_session(model, config)

    make_session = export.make_session
    monkeypatch.setattr(export, "make_session", spy)
    config = SessionConfig(threads=2, spinning=False, opt_level="basic")
    check = verify_onnx(net, path, torch.randn(2, *SHAPE), session=config)
    assert used == [config]
    assert check.session == config.describe() and check.session["graph_optimization_level"] == "ORT_ENABLE_BASIC"
    default = verify_onnx(net, path, torch.randn(2, *SHAPE))
    assert used[-1] == VERIFY_SESSION and default.session["intra_op_num_threads"] == 0
