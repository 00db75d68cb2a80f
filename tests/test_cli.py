"""The `slimdeploy` command and its subcommands (the tools/*.py shims run the same code)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slimdeploy import cli
from slimdeploy.exports import EXPORTS

ROOT = Path(__file__).resolve().parents[1]


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


HELP_ENTRY_POINTS = {  # how each way of starting `compress --help` is run in a fresh interpreter
    "tools/compress.py": f"runpy.run_path({str(ROOT / 'tools' / 'compress.py')!r}, run_name='__main__')",
    "python -m slimdeploy.cli.compress": "runpy.run_module('slimdeploy.cli.compress', run_name='__main__')",
    "slimdeploy compress": "from slimdeploy.cli import main; main(['compress', '--help'])",
}


@pytest.mark.parametrize("entry", HELP_ENTRY_POINTS)
def test_compress_help_lists_the_export_formats_without_importing_torch(entry):
    probe = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["compress", "--help"]
        try:
            {HELP_ENTRY_POINTS[entry]}
        except SystemExit as exit_:
            assert exit_.code in (0, None), exit_.code
        print("torch modules:", *sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
    """)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    help_text, imported = res.stdout.rsplit("torch modules:", 1)
    assert imported.split() == []
    assert EXPORTS.names() and all(name in help_text for name in EXPORTS.names())


def test_api_functions_stay_functions_when_loaded_on_first_use():
    # importing the submodule slimdeploy.prune first sets the package's `prune`, which must stay the function
    probe = ("import slimdeploy.prune, slimdeploy.api; import slimdeploy as sd; from slimdeploy import prune; "
             "print(sd.prune is prune is slimdeploy.api.prune, sd.sparsify is slimdeploy.api.sparsify)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "True"]
