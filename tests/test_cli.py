"""The `slimdeploy` command and its subcommands (the tools/*.py shims run the same code)."""

import subprocess
import sys
from pathlib import Path

from slimdeploy import cli


def test_usage_lists_the_commands(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    err = capsys.readouterr().err
    assert all(name in err for name in ("compress", "bench", "compare"))


def test_subcommands_dispatch(tmp_path, capsys):
    assert cli.main(["compress", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: recipe file not found" in capsys.readouterr().err
    assert cli.main(["bench", str(tmp_path / "nope.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "slimdeploy"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "compress" in res.stderr
