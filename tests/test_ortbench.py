"""ortbench: one SessionConfig for every onnxruntime session, interleaved timing, profiling, and the
command line, which runs where only numpy and onnxruntime are installed."""

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from slimdeploy import ortbench
from slimdeploy.ortbench import (
    SPINNING_KEY, ConvSpec, SessionConfig, make_session, spinning_for, time_sessions,
)

ROOT = Path(__file__).resolve().parents[1]
LARGE = ConvSpec(3, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))
SMALL = ConvSpec(3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two one-conv ONNX files (written without torch)."""
    folder = tmp_path_factory.mktemp("ortbench")
    paths = []
    for name, spec in (("large", LARGE), ("small", SMALL)):
        path = folder / f"{name}.onnx"
        path.write_bytes(spec.onnx_bytes())
        paths.append(path)
    return paths


def test_time_sessions_sane(models):
    path = models[0]
    stats = time_sessions([path, path], batch=2, config=SessionConfig(threads=1), warmup=3, iters=30)
    assert len(stats) == 2
    for s in stats:
        assert 0 < s.p50 <= s.p90 <= s.p99
        assert s.mean > 0 and s.std >= 0 and s.throughput > 0
        assert (s.batch, s.threads) == (2, 1)
        assert set(s.to_dict()) >= {"p50", "p90", "p99", "mean", "std", "throughput"}
    assert make_session(path, SessionConfig(threads=1)).get_session_options().intra_op_num_threads == 1


def test_session_config_sets_up_the_session(models):
    config = SessionConfig(threads=2, spinning=False, opt_level="basic")
    opts = make_session(models[0], config).get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert opts.get_session_config_entry(SPINNING_KEY) == "0"
    assert config.describe() == {
        "provider": "CPUExecutionProvider", "intra_op_num_threads": 2, "inter_op_num_threads": 1,
        "intra_op_spinning": False, "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_BASIC", "onnxruntime": ort.__version__,
    }
    default = make_session(models[0]).get_session_options()
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(RuntimeError, match=SPINNING_KEY):  # left at onnxruntime's default (spinning)
        default.get_session_config_entry(SPINNING_KEY)


def test_interleaved_sessions_do_not_spin(models, monkeypatch):
    # spinning pool threads of idle sessions would steal the cores of the one being timed
    assert spinning_for(1) and not spinning_for(2)
    config = SessionConfig(threads=2)
    assert config.for_timing(1) == config and config.for_timing(2) == SessionConfig(threads=2, spinning=False)
    assert not SessionConfig(spinning=False).for_timing(1).spinning  # a choice to switch it off stays
    used = []

    def spy(path, config):
        used.append(config)
        return make_session(path, config)

    monkeypatch.setattr(ortbench, "make_session", spy)
    time_sessions(models, config=config, warmup=0, iters=2)
    time_sessions(models[:1], config=config, warmup=0, iters=2)
    assert [c.spinning for c in used] == [False, False, True]


@pytest.mark.parametrize("fields, word", [
    ({"threads": -1}, "threads must be an integer >= 0"),
    ({"threads": 1.5}, "threads must be an integer >= 0"),
    ({"opt_level": "max"}, "opt_level must be one of disable, basic, extended, all, got 'max'"),
    ({"provider": "NoSuchExecutionProvider"}, "provider 'NoSuchExecutionProvider' is not available"),
])
def test_bad_session_config_is_refused_in_one_line(fields, word):
    with pytest.raises(ValueError, match=word) as err:
        SessionConfig(**fields)
    assert "\n" not in str(err.value)


def test_cli_refuses_a_bad_session_in_one_line(models, capsys):
    assert ortbench.main([str(models[0]), "--threads", "-1"]) == 2
    assert ortbench.main([str(models[0]), "--provider", "NoSuchExecutionProvider"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "threads" in lines[0] and "NoSuchExecutionProvider" in lines[1]


def test_profile_events_leave_no_file_behind(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    events = ortbench.profile_events(models[0], batch=2, config=SessionConfig(threads=1), runs=3)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert kernels and all(e["dur"] >= 0 for e in kernels)
    assert any(e["args"]["op_name"] == "Conv" for e in kernels)
    assert list(tmp_path.iterdir()) == [] and not list(models[0].parent.glob("*profile*"))


def test_cli_runs_without_torch(models, tmp_path):
    large, small = models
    fake = tmp_path / "fake_site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    out = tmp_path / "res.json"
    env = {"PYTHONPATH": str(fake.parent), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), str(large), str(small),
           "--warmup", "2", "--iters", "10", "--opt-level", "basic", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout
    data = json.loads(out.read_text())
    assert data["settings"]["batch"] == 1 and data["settings"]["iters"] == 10
    session = data["settings"]["session"]
    assert session == SessionConfig(threads=1, spinning=False, opt_level="basic").describe()
    res = data["results"]
    assert [r["model"] for r in res] == [str(large), str(small)]
    assert res[0]["speedup_vs_first"] == pytest.approx(1.0)
    assert res[1]["size_bytes"] == small.stat().st_size > 0
    lat = res[1]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]

    # Sanity check of the harness itself: torch really is unimportable there.
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, env=env)
    assert probe.returncode != 0

    missing = subprocess.run(cmd[:2] + [str(tmp_path / "nope.onnx")], capture_output=True, text=True, env=env)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "nope.onnx" in missing.stderr

    usage = subprocess.run([sys.executable, str(ROOT / "slimdeploy" / "ortbench.py"), "--help"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert usage.returncode == 0 and "--opt-level" in usage.stdout


def test_time_quietest_keeps_the_run_whose_first_model_was_fastest(monkeypatch):
    runs = iter([(3.0, 2.0), (1.0, 0.6), (2.0, 0.5)])  # (first, second) model p50 per block

    def timing(paths, batch=1, **kwargs):
        return [ortbench.latency_stats([ms * 1e6] * 3, batch, 1) for ms in next(runs)]

    monkeypatch.setattr(ortbench, "time_sessions", timing)
    first, second = ortbench.time_quietest(["a.onnx", "b.onnx"], blocks=3)
    assert (first.p50, second.p50) == (1.0, 0.6)  # a slowed block's lower second p50 does not count
