"""Untrusted input: a planted CIFAR batch cannot run code, and a recipe value out of range gets exit 2 and
one line naming its dotted key."""

import builtins
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimdeploy.data import DataError, load_cifar

from slimdeploy.cli import compress as cli

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the official CIFAR files: every string a byte string."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_byte_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = _save_byte_string


def _official_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def _write_py2(path: Path, batch: dict) -> None:
    """The official files were pickled under numpy 1.x, which named numpy.core.multiarray."""
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(batch)
    path.write_bytes(path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def _write_py3(path: Path, batch: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=4)


def _write_py3_numpy_labels(path: Path, batch: dict) -> None:
    """Labels as numpy integers (``list(array)``), which pickle as numpy scalars."""
    _write_py3(path, {k: list(np.array(v)) if k == b"labels" else v for k, v in batch.items()})


def _cifar_folder(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    return folder


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize(
    "payload, nested, forbidden",
    [
        (_System, False, f"{os.system.__module__}.system"),
        (_Open, False, f"{builtins.open.__module__}.open"),
        (_System, True, f"{os.system.__module__}.system"),  # hidden inside an otherwise valid batch
    ],
)
def test_planted_batch_is_refused_and_never_runs(tmp_path, payload, nested, forbidden):
    folder = _cifar_folder(tmp_path)
    for i, name in enumerate(CIFAR10_FILES):
        _write_py3(folder / name, _official_batch(4, i))
    marker = tmp_path / "pwned"
    evil = payload(marker)
    planted = folder / "data_batch_1"
    _write_py3(planted, {**_official_batch(4, 0), b"labels": [evil]} if nested else evil)

    with pytest.raises(DataError) as err:
        load_cifar("cifar10", tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(planted) in message and forbidden in message, message
    assert not marker.exists()

    # The planted file is live: an unrestricted load runs it. In a child process, because os.system
    # forking this multi-threaded test process (torch, onnxruntime and OpenMP pools) can crash it.
    load = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'), encoding='bytes')"
    subprocess.run([sys.executable, "-c", load, str(planted)], capture_output=True, timeout=120)
    assert marker.exists()


@pytest.mark.parametrize("write", [_write_py2, _write_py3, _write_py3_numpy_labels],
                         ids=["official_py2_numpy1", "py3_numpy2", "numpy_int_labels"])
def test_official_format_batches_load(tmp_path, write):
    folder = _cifar_folder(tmp_path)
    batches = [_official_batch(3 + i, i) for i in range(len(CIFAR10_FILES))]
    for name, batch in zip(CIFAR10_FILES, batches):
        write(folder / name, batch)
    write(folder / "batches.meta", {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": 10000})
    if write is _write_py2:
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in (folder / "test_batch").read_bytes()

    data = load_cifar("cifar10", tmp_path)

    train, test = batches[:-1], batches[-1]
    assert data.train.images.shape == (sum(len(b[b"labels"]) for b in train), 3, 32, 32)
    expected = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)  # rows are CHW
    np.testing.assert_array_equal(data.train.images.numpy(), expected)
    assert data.train.labels.tolist() == [label for b in train for label in b[b"labels"]]
    np.testing.assert_array_equal(data.test.images.numpy(), test[b"data"].reshape(-1, 3, 32, 32))
    assert data.test.labels.tolist() == test[b"labels"]


@pytest.mark.parametrize(
    "sparsity, key, allowed",
    [
        ("{penalty: scad, a: 2}", "sparsity.a", "(2, inf) for scad"),
        ("{penalty: mcp, a: 1}", "sparsity.a", "(1, inf) for mcp"),
        ("{penalty: tl1, a: 0}", "sparsity.a", "(0, inf) for tl1"),
        ("{penalty: tl1, a: .nan}", "sparsity.a", "(0, inf) for tl1"),
        ("{penalty: lp, p: 1.5}", "sparsity.p", "less than 1"),
        ("{penalty: lp, p: 0}", "sparsity.p", "greater than 0"),
        ("{penalty: scad, lam: .inf}", "sparsity.lam", "finite"),
        ("{method: proximal, beta: .inf}", "sparsity.beta", "finite"),
    ],
)
def test_penalty_range_error_names_the_dotted_key(tmp_path, capsys, sparsity, key, allowed):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"model: {{name: resnet20}}\nsparsity: {sparsity}\n")
    out = tmp_path / "run"

    code = cli.main([str(recipe), "--out", str(out), "--quiet"])

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"{recipe}: {key}: " in lines[0] and allowed in lines[0], lines[0]
    assert not out.exists()
