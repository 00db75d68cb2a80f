import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from slimdeploy.bench import (
    count_flop_counter_macs, count_macs, count_params, file_size, peak_rss_mb, torch_latency,
)
from slimdeploy.export import NEGLIGIBLE, ExportMismatchError, export_onnx, verify_onnx
from slimdeploy.ortbench import input_shape_for, make_session, spinning_for, time_sessions

ROOT = Path(__file__).resolve().parents[1]
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


def test_time_sessions_sane(exported):
    _, path = exported
    stats = time_sessions([path, path], batch=2, threads=1, warmup=3, iters=30)
    assert len(stats) == 2
    for s in stats:
        assert 0 < s.p50 <= s.p90 <= s.p99
        assert s.mean > 0 and s.std >= 0 and s.throughput > 0
        assert (s.batch, s.threads) == (2, 1)
        assert set(s.to_dict()) >= {"p50", "p90", "p99", "mean", "std", "throughput"}
    assert make_session(path, 1).get_session_options().intra_op_num_threads == 1


def test_interleaved_sessions_do_not_spin(exported):
    # spinning pool threads of idle sessions would steal the cores of the one being timed
    _, path = exported
    spin_key = "session.intra_op.allow_spinning"
    assert make_session(path, 2, spinning=False).get_session_options().get_session_config_entry(spin_key) == "0"
    assert spinning_for(1) and not spinning_for(2)


def test_cli_runs_without_torch(exported, tmp_path):
    _, path = exported
    small = export_onnx(make_net(width=4), tmp_path / "small.onnx", SHAPE)
    fake = tmp_path / "fake_site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    out = tmp_path / "res.json"
    env = {"PYTHONPATH": str(fake.parent), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), str(path), str(small),
           "--warmup", "2", "--iters", "10", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout
    data = json.loads(out.read_text())
    assert data["settings"]["batch"] == 1 and data["settings"]["iters"] == 10
    assert data["settings"]["session"]["intra_op_num_threads"] == 1
    res = data["results"]
    assert [r["model"] for r in res] == [str(path), str(small)]
    assert res[0]["speedup_vs_first"] == pytest.approx(1.0)
    assert res[1]["size_bytes"] == file_size(small) > 0
    lat = res[1]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]

    # Sanity check of the harness itself: torch really is unimportable there.
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, env=env)
    assert probe.returncode != 0

    missing = subprocess.run(cmd[:2] + [str(tmp_path / "nope.onnx")], capture_output=True, text=True, env=env)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "nope.onnx" in missing.stderr


class HandCounted(nn.Module):
    """Conv 3->4 (3x3, no bias) on 8x8, ReLU, Flatten, Linear 256->10."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


def test_mac_and_param_counts():
    model = HandCounted()
    conv = 8 * 8 * 4 * (3 * 3 * 3)  # output elements x MACs per output
    linear = 256 * 10
    assert count_macs(model, (3, 8, 8)) == conv + linear
    assert count_flop_counter_macs(model, (3, 8, 8)) == conv + linear
    assert count_params(model) == 4 * 27 + 256 * 10 + 10
    assert not any(hasattr(m, "total_ops") for m in model.modules())  # thop left no buffers


def test_torch_latency_and_rss(exported):
    net, path = exported
    stats = torch_latency([net, make_net(width=4)], SHAPE, batch=1, threads=1, warmup=2, iters=10)
    assert all(0 < s.p50 <= s.p90 <= s.p99 for s in stats)
    assert net.training
    assert peak_rss_mb(path) > 1.0


@pytest.mark.slow
def test_prune_latency_benchmark_runs():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prune_latency.py"), "--model", "resnet20",
                          "--iters", "2", "--warmup", "0", "--profile"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("batch ")]
    assert len(rows) == 4 and all(line.split()[-2].endswith("×") for line in rows)  # 2 settings × 2 variants
    assert "kernel time" in res.stdout and "resnet164: dependency graph" in res.stdout
