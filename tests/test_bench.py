"""Torch-side measurements: MACs, parameters, eager latency, and ONNX Runtime peak memory."""

import json

import pytest
from torch import nn

from slimdeploy import bench
from slimdeploy.bench import count_flop_counter_macs, count_macs, count_params, peak_rss_mb, torch_latency
from slimdeploy.export import export_onnx
from slimdeploy.ortbench import SessionConfig

SHAPE = (3, 8, 8)


class HandCounted(nn.Module):
    """Conv 3->4 (3x3, no bias) on 8x8, ReLU, Flatten, Linear 256->10."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_onnx(HandCounted(), tmp_path_factory.mktemp("bench") / "hand.onnx", SHAPE)


def test_mac_and_param_counts():
    model = HandCounted()
    conv = 8 * 8 * 4 * (3 * 3 * 3)  # output elements x MACs per output
    linear = 256 * 10
    assert count_macs(model, SHAPE) == conv + linear
    assert count_flop_counter_macs(model, SHAPE) == conv + linear
    assert count_params(model) == 4 * 27 + 256 * 10 + 10
    assert not any(hasattr(m, "total_ops") for m in model.modules())  # thop left no buffers


def test_torch_latency_and_rss(exported):
    net = HandCounted().train()
    stats = torch_latency([net, nn.Sequential(nn.Flatten(), nn.Linear(192, 10))], SHAPE, batch=1, threads=1,
                          warmup=2, iters=10)
    assert all(0 < s.p50 <= s.p90 <= s.p99 for s in stats)
    assert net.training and all(m.training for m in net.modules())
    assert peak_rss_mb(exported) > 1.0


def test_peak_rss_child_gets_the_session_config_and_no_torch(exported, tmp_path, monkeypatch):
    fake = tmp_path / "fake_site" / "torch"  # torch would count in the peak: the child must not import it
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    argvs = []
    run = bench.subprocess.run

    def spy(argv, **kwargs):
        argvs.append(argv)
        return run(argv, env={"PYTHONPATH": str(fake.parent), "PATH": "/usr/bin:/bin"}, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", spy)
    config = SessionConfig(threads=2, spinning=False, opt_level="extended")
    assert peak_rss_mb(exported, batch=3, config=config) > 1.0
    assert SessionConfig(**json.loads(argvs[0][-1])) == config
