"""Malformed recipes thrown at the CLI: every one gets exit code 2 (1 for I/O) and a single line on
stderr naming the key or path, never a traceback, and no run directory."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimdeploy.cli import compress as cli

VALID = {"model": {"name": "resnet20"}, "data": {"name": "synthetic"}, "train": {"epochs": 1}}
NUMERIC = ["train.epochs", "train.lr", "sparsity.lam", "sparsity.beta", "prune.percent", "data.batch_size",
           "finetune.epochs", "bench.iters", "export.opset", "seed"]
OUT_OF_RANGE = [
    ("sparsity.lam", st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False), {}),
    ("sparsity.p", st.one_of(st.floats(max_value=0, allow_nan=False), st.floats(min_value=1, allow_nan=False)),
     {"sparsity.penalty": "lp"}),
    ("sparsity", st.floats(max_value=0, allow_nan=False), {"sparsity.penalty": "tl1"}),
    ("sparsity", st.floats(max_value=1, allow_nan=False), {"sparsity.penalty": "mcp"}),
    ("sparsity", st.floats(max_value=2, allow_nan=False), {"sparsity.penalty": "scad"}),
    ("prune.percent", st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=1, allow_nan=False)), {}),
    ("train.epochs", st.integers(max_value=-1), {}),
    ("finetune.epochs", st.integers(max_value=-1), {}),
    ("model.name", st.text(min_size=1, max_size=12).filter(lambda s: s.strip() and ":" not in s), {}),
    ("data.name", st.text(min_size=1, max_size=12).filter(lambda s: s not in ("cifar10", "cifar100", "synthetic")), {}),
]


def _put(tree, dotted, value):
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def _run(tmp_path, text, capsys):
    recipe = tmp_path / "fuzz.yaml"
    recipe.write_text(text)
    out = tmp_path / "run"
    code = cli.main([str(recipe), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not out.exists()
    return code, err


@st.composite
def out_of_range(draw):
    key, values, extra = draw(st.sampled_from(OUT_OF_RANGE))
    tree = yaml.safe_load(yaml.safe_dump(VALID))
    for k, v in extra.items():
        _put(tree, k, v)
    value = draw(values)
    _put(tree, "sparsity.a" if key == "sparsity" else key, value)
    return tree, key


@st.composite
def wrong_type(draw):
    key = draw(st.sampled_from(NUMERIC))
    value = draw(st.one_of(st.text(alphabet="abcxyz", min_size=1), st.lists(st.integers(), min_size=1),
                           st.dictionaries(st.sampled_from("ab"), st.integers(), min_size=1)))
    tree = yaml.safe_load(yaml.safe_dump(VALID))
    _put(tree, key, value)
    return tree, key


@st.composite
def unknown_key(draw):
    section = draw(st.sampled_from(["", "model.", "data.", "train.", "sparsity.", "prune.", "bench."]))
    name = draw(st.from_regex(r"[a-z_]{3,10}", fullmatch=True).filter(lambda n: n not in {
        "name", "bn_init", "root", "epochs", "lr", "momentum", "method", "penalty", "lam", "beta", "how",
        "percent", "threshold", "iters", "warmup", "settings", "seed", "device", "model", "data", "train",
        "sparsity", "prune", "finetune", "export", "bench", "augment", "gamma", "schedule", "include",
        "exclude", "nesterov", "amp", "torch", "opset", "tolerance", "round_to", "compensate"}))
    tree = yaml.safe_load(yaml.safe_dump(VALID))
    _put(tree, section + name, 1)
    return tree, section + name


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.slow
@FUZZ
@given(case=st.one_of(out_of_range(), wrong_type(), unknown_key()))
def test_bad_recipes_exit_2_naming_the_key(tmp_path, capsys, case):
    tree, key = case
    code, err = _run(tmp_path, yaml.safe_dump(tree), capsys)
    assert code == 2 and len(err) == 1, err
    assert key in err[0] and "Traceback" not in err[0], (key, err)


@FUZZ
@given(text=st.text(alphabet="{}[]:,-'\"\n\t ab1#&*!|>", max_size=40))
def test_broken_yaml_never_tracebacks(tmp_path, capsys, text):
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        tree = "broken"
    if isinstance(tree, dict) or tree is None:  # valid YAML mappings are covered above
        return
    code, err = _run(tmp_path, text, capsys)
    assert code == 2 and len(err) == 1 and "fuzz.yaml" in err[0], err


def test_missing_file_and_unwritable_out(tmp_path, capsys):
    assert cli.main([str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(yaml.safe_dump(VALID))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main([str(recipe), "--out", str(blocker / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file" in err[0] and "Traceback" not in err[0]
