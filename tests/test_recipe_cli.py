"""Recipe validation and the CLI's contract: bad input → exit 2 and one line naming the key."""

import pytest

from slimdeploy.data import DATASETS
from slimdeploy.models.registry import MODELS
from slimdeploy.penalties import PENALTIES
from slimdeploy.plan import PLAN_MODES
from slimdeploy.recipe import RecipeError, build_recipe, load_recipe
from slimdeploy.sparsity import SPARSIFIERS
from slimdeploy.train import SCHEDULES

from helpers import ROOT, run_cli


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    load_recipe(recipe)


def test_shipped_mcp_and_scad_recipes_reach_the_initial_gamma():
    # MCP and SCAD act only where |γ| ≤ a·λ: a reach below the initial γ makes the run a dense one
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        r = load_recipe(path)
        if r.sparsity.method != "none" and r.sparsity.penalty in ("mcp", "scad"):
            assert r.sparsity.a * r.sparsity.lam >= (r.model.bn_init or 1.0), path.name


def test_overrides_parse_yaml_scalars_and_lists():
    r = build_recipe({}, ["train.epochs=2", "data.name=synthetic", "train.milestones=[0.3, 0.6]", "model.bn_init=null"])
    assert r.train.epochs == 2 and r.data.name == "synthetic"
    assert r.train.milestones == [0.3, 0.6] and r.model.bn_init is None


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["sparsity.lam=-1"], "sparsity.lam"),
        (["prune.percent=1.0"], "prune.percent"),
        (["train.epochs=-3"], "train.epochs"),
        (["train.epochs=many"], "train.epochs"),
        (["model.name=alexnet9"], "model.name"),
        (["data.name=imagenet"], "data.name"),
        (["train.lr_warmup=3"], "train.lr_warmup"),
        (["sparsity.penalty=lp", "sparsity.p=1.5"], "sparsity.p"),
        (["sparsity.penalty=mcp", "sparsity.a=0.5"], "sparsity"),
        (["sparsity.penalty=scad", "sparsity.a=2"], "sparsity"),
        (["sparsity.penalty=tl1", "sparsity.a=0"], "sparsity"),
        (["train.milestones=[0.8, 0.2]"], "train.milestones"),
        (["prune.round_to=0"], "prune.round_to"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(RecipeError) as err:
        build_recipe({}, overrides)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "text, args, key",
    [
        ("model: {name: resnet20}\nsparsity: {lam: -0.1}\n", [], "sparsity.lam"),
        ("model: {name: resnet20}\nprune: {percent: 1.5}\n", [], "prune.percent"),
        ("model: {name: resnet20}\nbogus: 1\n", [], "bogus"),
        ("model: [1, 2\n", [], "not valid YAML"),
        ("- a list\n", [], "mapping"),
        ("model: {name: resnet20}\n", ["--set", "train.epochs=-1"], "train.epochs"),
        ("model: {name: resnet20}\n", ["--set", "noequals"], "KEY=VALUE"),
        ("model: {name: resnet20}\n", ["--export", "tflite"], "--export"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, text, args, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    res = run_cli(path, out=out, args=args, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_missing_recipe_file(tmp_path):
    res = run_cli(tmp_path / "nope.yaml", timeout=120)
    assert res.returncode == 2 and "nope.yaml" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_missing_cifar_says_where_and_how(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: resnet20}\ndata: {name: cifar10}\n")
    res = run_cli(path, f"data.root={tmp_path / 'empty'}", out=tmp_path / "run", timeout=120)
    assert res.returncode == 1
    line = res.stderr.strip().splitlines()[-1]
    assert "cifar-10-batches-py" in line and "data.name=synthetic" in line and "Traceback" not in res.stderr


@pytest.mark.slow
def test_paper_recipes_start():
    """Every paper recipe loads, and its model and sparsifier take one training step."""
    import torch

    from slimdeploy.models import build_model
    from slimdeploy.sparsity import make_sparsifier
    from slimdeploy.train import make_optimizer

    torch.set_num_threads(1)
    models = {}
    recipes = sorted((ROOT / "recipes" / "paper").glob("*.yaml"))
    assert len(recipes) >= 21
    for path in recipes:
        r = load_recipe(path)
        classes = 100 if r.data.name == "cifar100" else 10
        key = (r.model.name, classes)
        if key not in models:
            models[key] = build_model(r.model.name, classes, bn_init=r.model.bn_init)
        model = models[key]
        sparsifier = make_sparsifier(model, **r.sparsity.model_dump())
        optimizer = make_optimizer(model, r.train)
        loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
        loss.backward()
        sparsifier.before_step()
        optimizer.step()
        sparsifier.after_step(r.train.lr)
        optimizer.zero_grad()
        assert all(torch.isfinite(p).all() for p in model.parameters()), path.name


# every recipe key whose value is a registered name
RECIPE_CHOICES = [
    ("sparsity.method", SPARSIFIERS),
    ("sparsity.penalty", PENALTIES),
    ("prune.how", PLAN_MODES),
    ("train.schedule", SCHEDULES),
    ("finetune.schedule", SCHEDULES),
    ("data.name", DATASETS),
    ("model.name", MODELS),
]


@pytest.mark.parametrize("key, registry", RECIPE_CHOICES, ids=[key for key, _ in RECIPE_CHOICES])
def test_recipe_accepts_every_registered_name(key, registry):
    for name in registry.names():
        overrides = [f"{key}={name}", "prune.target_speedup=2"] if name == "latency" else [f"{key}={name}"]
        recipe = build_recipe({}, overrides)
        section, field = key.split(".")
        assert getattr(getattr(recipe, section), field) == name


@pytest.mark.parametrize("key, registry", RECIPE_CHOICES, ids=[key for key, _ in RECIPE_CHOICES])
def test_recipe_refuses_other_names_listing_the_registered_ones(key, registry):
    with pytest.raises(RecipeError) as err:
        build_recipe({}, [f"{key}=no_such_choice"])
    message = str(err.value)
    assert f"{key}: unknown " in message and "'no_such_choice'" in message
    assert f"allowed: {', '.join(registry.names())}" in message and "\n" not in message
