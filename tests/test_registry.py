"""Named choices: the Registry itself, and every kind of choice read by the recipe, the CLI and the code
from one registry, so a newly registered choice is accepted without other edits."""

import pytest
import torch
from torch import nn

from slimdeploy import penalties
from slimdeploy.cli import compress as cli
from slimdeploy.models.registry import MODEL_NAMES, MODELS, check_model_name, is_known_model
from slimdeploy.penalties import PENALTIES
from slimdeploy.pipeline import EXPORTS
from slimdeploy.plan import PLAN_MODES
from slimdeploy.recipe import RecipeError, build_recipe
from slimdeploy.registry import Registry
from slimdeploy.runtimes import RUNTIMES
from slimdeploy.sparsity import make_sparsifier
from slimdeploy.train import SCHEDULES, lr_factor

# ---------------------------------------------------------------------------- Registry
def _colours() -> Registry:
    colours = Registry("colour")
    colours.register("red", description="warm")(1)

    @colours.register("blue")
    def blue():
        """Cold, and more text.

        A second paragraph."""

    return colours


def test_register_keeps_order_object_and_description():
    colours = _colours()
    assert colours.names() == ("red", "blue")
    assert colours.get("red") == 1 and colours.get("blue").__name__ == "blue"  # the decorator returns it
    assert colours.describe() == {"red": "warm", "blue": "Cold, and more text."}
    assert "red" in colours and "green" not in colours and ["red"] not in colours


def test_unknown_name_lists_the_allowed_ones():
    colours = _colours()
    for bad in ("green", None, ["red"]):
        with pytest.raises(ValueError) as err:
            colours.get(bad)
        assert str(err.value) == f"unknown colour {bad!r}; allowed: red, blue"


def test_duplicate_refused_and_unregister():
    colours = _colours()
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        colours.register("red")(2)
    colours.unregister("red")
    assert colours.names() == ("blue",)
    with pytest.raises(ValueError, match="allowed: blue"):
        colours.unregister("red")


# ------------------------------------------------------------------------------ recipe
class HalfL1Penalty(penalties.L1Penalty):
    """λ|x|/2."""

    name = "half_l1"

    def __init__(self, lam: float):
        super().__init__(lam / 2)


@pytest.fixture
def half_l1():
    PENALTIES.register("half_l1")(HalfL1Penalty)
    yield
    PENALTIES.unregister("half_l1")


def test_a_registered_penalty_is_accepted_by_the_recipe_and_the_sparsifier(half_l1):
    recipe = build_recipe({}, ["sparsity.penalty=half_l1", "sparsity.lam=0.5"])
    assert isinstance(recipe.sparsity.make_penalty(), HalfL1Penalty)
    sparsifier = make_sparsifier(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), **recipe.sparsity.model_dump())
    assert isinstance(sparsifier.penalty, HalfL1Penalty) and sparsifier.penalty.lam == 0.25
    assert "half_l1" in PENALTIES.describe() and PENALTIES.describe()["half_l1"] == "λ|x|/2."


# ------------------------------------------------------------------------ the registries
@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_starts_positive_and_never_grows_after_warm_up(name):
    cfg = build_recipe({}, [f"train.schedule={name}"]).train
    factors = [lr_factor(cfg, step / 100) for step in range(20, 100)]
    assert 0 < lr_factor(cfg, 0.0) <= 1 and all(0 <= f <= 1 for f in factors)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(factors, factors[1:]))


def test_schedules_follow_their_formulas():
    cfg = build_recipe({}, ["train.milestones=[0.5, 0.75]", "train.gamma=0.1"]).train
    expected = {"multistep": 0.1, "cosine": 0.5, "constant": 1.0}
    for name, factor in expected.items():
        assert lr_factor(cfg.model_copy(update={"schedule": name}), 0.5) == pytest.approx(factor)
    assert lr_factor(cfg.model_copy(update={"schedule": "onecycle"}), 0.0) == pytest.approx(0.1)


REMOVED = {  # scores [0, 0.2, 0.1, 0.4] with amount 0.3 (percent: one of the four; threshold: below 0.3)
    "percent": [True, False, False, False],
    "threshold": [True, True, True, False],
    "zeros": [True, False, False, False],
    "none": [False] * 4,
    "latency": [False] * 4,  # its widths come from the latency budget
}


@pytest.mark.parametrize("name", PLAN_MODES.names())
def test_every_plan_mode_marks_its_channels(name):
    masks, _ = PLAN_MODES.get(name)([torch.tensor([0.0, 0.2]), torch.tensor([0.1, 0.4])], 0.3)
    assert torch.cat(masks).tolist() == REMOVED[name]


def test_export_choices_of_the_command_line_are_the_export_formats(capsys):
    for name in EXPORTS.names():
        assert cli.parse_args(["r.yaml", "--export", name]).export == name
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["r.yaml", "--export", "tflite"])
    assert exit_.value.code == 2 and ", ".join(map(repr, EXPORTS.names())) in capsys.readouterr().err


def test_models_validate_once():
    assert MODEL_NAMES == MODELS.names()
    for name in ("resnet20", "torchvision:resnet18", "torchvision:nope", "resnet18", "pkg.mod:factory", 3):
        try:
            check_model_name(name)
            accepted = True
        except ValueError:
            accepted = False
        assert is_known_model(name) == (accepted and name != "pkg.mod:factory"), name
        try:
            build_recipe({}, [f"model.name={name}"])
            assert accepted, name
        except RecipeError:
            assert not accepted, name


def test_unknown_runtime_lists_the_registered_ones():
    with pytest.raises(RecipeError, match=f"bench.runtimes: unknown runtime 'tensorrt'; allowed: "
                                          f"{', '.join(RUNTIMES.names())}"):
        build_recipe({}, ["bench.runtimes=[tensorrt]"])
