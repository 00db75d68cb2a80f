import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import slimdeploy as sd
from slimdeploy import latency, ortbench
from slimdeploy.errors import InputError
from slimdeploy.recipe import RecipeError, build_recipe
from slimdeploy.graph import BNSlot, ChannelGroup, build_graph, channel_groups
from slimdeploy.models import build_model
from slimdeploy.plan import group_scores, make_plan


def _brute_force(options, budget):
    best = -np.inf
    for combo in itertools.product(*options):
        if sum(cost for cost, _ in combo) <= budget:
            best = max(best, sum(value for _, value in combo))
    return best


def _value(options, picked):
    return sum(item[k][1] for item, k in zip(options, picked))


def _cost(options, picked):
    return sum(item[k][0] for item, k in zip(options, picked))


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    options = [[(rng.randint(1, 9), rng.uniform(0, 5)) for _ in range(rng.randint(1, 4))] for _ in range(4)]
    budget = rng.randint(4, 30)
    picked = latency.knapsack(options, budget, bins=budget)  # integer costs: one bin per unit, exact
    best = _brute_force(options, budget)
    if best == -np.inf:
        assert picked is None
    else:
        assert _cost(options, picked) <= budget
        assert _value(options, picked) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(10))
def test_knapsack_with_real_costs_fits_and_is_near_optimal(seed):
    rng = random.Random(seed)
    options = [[(rng.uniform(0.01, 1), rng.uniform(0, 1)) for _ in range(5)] for _ in range(5)]
    budget = rng.uniform(1, 3)
    picked = latency.knapsack(options, budget, bins=1000)
    assert _cost(options, picked) <= budget
    # costs are rounded up to budget/1000 per item, so only choices that close to the budget can be missed
    assert _value(options, picked) >= _brute_force(options, budget * (1 - 5 / 1000)) - 1e-12


def test_knapsack_returns_none_when_nothing_fits():
    assert latency.knapsack([[(2.0, 1.0), (3.0, 2.0)], [(2.0, 1.0)]], budget=3.9) is None


def _group(channels, ch_groups=1):
    return ChannelGroup("conv", channels, [BNSlot("bn", list(range(channels)), list(range(channels)))], ch_groups)


def test_group_choices_are_aligned_and_at_least_min_channels():
    scores = torch.rand(64, dtype=torch.float64)
    choices = latency.group_choices(_group(64), scores, round_to=8, min_channels=10)
    assert choices.widths == [16, 24, 32, 40, 48, 56, 64]
    ranked = scores.sort(descending=True).values
    assert choices.values == pytest.approx([float(ranked[:w].sum()) for w in choices.widths])


def test_group_choices_keep_channels_without_scores():
    scores = torch.rand(32, dtype=torch.float64)
    scores[:11] = float("inf")  # no BN saw them: no evidence to remove them
    assert latency.group_choices(_group(32), scores, round_to=4, min_channels=1).widths == [12, 16, 20, 24, 28, 32]


def test_group_choices_per_conv_group():
    group = _group(24, ch_groups=3)  # 8 positions per conv group; alignment 6 is 2 positions per group
    choices = latency.group_choices(group, latency.position_scores(group, torch.rand(24)), round_to=6,
                                    min_channels=1)
    assert choices.widths == [6, 12, 18, 24]


def test_conv_spec_onnx_matches_torch():
    spec = ortbench.ConvSpec(8, 12, (3, 3), (2, 2), (1, 1), (1, 1), 4, (9, 7))
    model = onnx.load_from_string(spec.onnx_bytes())
    onnx.checker.check_model(model, full_check=True)
    weight, bias = (torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer)
    x = np.random.default_rng(0).standard_normal((2, 8, 9, 7), dtype=np.float32)
    got = ort.InferenceSession(spec.onnx_bytes(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = nn.functional.conv2d(torch.from_numpy(x), weight, bias, stride=2, padding=1, groups=4).numpy()
    assert got.shape == want.shape == (2, 12, *spec.out_hw())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


class _CountedTiming:
    """Stands in for onnxruntime timing: latency proportional to a conv's MACs, calls counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, paths, batch=1, threads=1, warmup=0, iters=0, **_):
        self.calls += 1
        model = onnx.load_from_string(paths[0])
        w = onnx.numpy_helper.to_array(model.graph.initializer[0])
        ms = 1e-6 * w.size * 100
        return [ortbench.LatencyStats(ms, ms, ms, ms, 0.0, 1.0, batch, threads)]


def _table_for(model, size, tmp_path, table_path=None):
    x = torch.randn(1, 3, size, size)
    graph = build_graph(model, x)
    groups = channel_groups(model, graph)
    scores = {n: m.weight.abs() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    choices = [latency.group_choices(g, group_scores(g, scores), 8, 1) for g in groups]
    return latency.latency_table(model, x, graph, groups, choices, batch=1, threads=1, table_path=table_path)


def test_table_is_cached_and_keyed_by_input_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timing = _CountedTiming()
    monkeypatch.setattr(ortbench, "time_sessions", timing)
    model = build_model("resnet20", 10).eval()
    _, path = _table_for(model, 32, tmp_path)
    first = timing.calls
    assert first > 1 and path.is_file() and path.is_relative_to(tmp_path)
    _, again = _table_for(model, 32, tmp_path)
    assert again == path and timing.calls == first  # reused: nothing timed
    _, other = _table_for(model, 24, tmp_path)
    assert other != path and timing.calls > first  # another input size is another table


def test_table_from_another_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ortbench, "time_sessions", _CountedTiming())
    table = tmp_path / "table.json"
    _table_for(build_model("resnet20", 10).eval(), 32, tmp_path, table)
    with pytest.raises(InputError, match="table.json: latency table made for another model"):
        _table_for(build_model("resnet20", 10).eval(), 24, tmp_path, table)


def test_choose_widths_fits_budget_and_keeps_dense_when_all_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(ortbench, "time_sessions", _CountedTiming())
    model = build_model("resnet20", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = build_graph(model, x)
    groups = channel_groups(model, graph)
    scores = {n: torch.rand(m.num_features) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    choices = [latency.group_choices(g, group_scores(g, scores), 8, 1) for g in groups]
    cost, _ = latency.latency_table(model, x, graph, groups, choices, 1, 1, tmp_path / "t.json")
    dense = cost.total_ms(cost.dense)
    assert latency.choose_widths(cost, choices, dense * 1.01) == cost.dense
    widths = latency.choose_widths(cost, choices, dense / 2)
    assert cost.total_ms(widths) <= dense / 2
    assert all(w % 8 == 0 or w == g.channels for w, g in zip(widths, groups))
    assert widths != [c.widths[0] for c in choices]  # the budget is used, not just the smallest widths


def test_ortbench_table_mode_times_every_described_layer(tmp_path):
    specs = [ortbench.ConvSpec(4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8)),
             ortbench.ConvSpec(8, 8, (1, 1), (2, 2), (0, 0), (1, 1), 8, (8, 8))]
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"key": "abc", "layers": [s.__dict__ for s in specs]}))
    out = tmp_path / "table.json"
    assert ortbench.main(["--table", str(layers), "--json", str(out), "--iters", "3", "--warmup", "0"]) == 0
    table = json.loads(out.read_text())
    assert table["key"] == "abc" and table["settings"]["onnxruntime"] == ort.__version__
    assert set(table["entries"]) == {s.key() for s in specs} | {ortbench.CALL_OVERHEAD_KEY}
    assert all(ms > 0 for ms in table["entries"].values())


def test_ortbench_table_mode_refuses_a_bad_description(tmp_path, capsys):
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"layers": [{"in_ch": 3}]}))
    assert ortbench.main(["--table", str(layers), "--json", str(tmp_path / "t.json")]) == 2
    assert "layers.json: a layer is not a conv description" in capsys.readouterr().err


def test_make_plan_latency_keeps_the_best_channels_at_the_given_widths():
    group = _group(8)
    scores = {"bn": torch.tensor([5.0, 1, 7, 2, 8, 3, 6, 4])}
    plan = make_plan([group], scores, how="latency", kept_widths={"conv": 3})
    assert plan.groups[0].remove == [0, 1, 3, 5, 7]  # keeps 8, 7, 6
    with pytest.raises(ValueError, match="kept_widths"):
        make_plan([group], scores, how="latency")


@pytest.mark.parametrize("overrides, key", [
    (["prune.how=latency", "prune.target_speedup=1"], "prune.target_speedup: Input should be greater than 1"),
    (["prune.how=latency", "prune.target_speedup=0.5"], "prune.target_speedup: Input should be greater than 1"),
    (["prune.how=latency", "prune.target_speedup=2", "prune.target_ms=1"], "prune.target_ms: set target_speedup or"),
    (["prune.how=latency"], "prune.target_ms: how: latency needs target_speedup or target_ms"),
    (["prune.target_speedup=2"], "prune.target_speedup: is only used with how: latency"),
    (["prune.how=latency", "prune.target_ms=0"], "prune.target_ms: Input should be greater than 0"),
    (["prune.how=latency", "prune.target_ms=1", "prune.latency_fit=below"],
     "prune.latency_fit: Input should be 'within' or 'at_most'"),
    (["prune.latency_fit=at_most"], "prune.latency_fit: is only used with how: latency"),
])
def test_recipe_latency_errors_name_the_key(overrides, key):
    with pytest.raises(RecipeError, match=key) as err:
        build_recipe({}, overrides)
    assert "\n" not in str(err.value)


def test_recipe_latency_prune_kwargs():
    kwargs = build_recipe({}, ["prune.how=latency", "prune.target_speedup=1.5"]).prune.prune_kwargs()
    assert kwargs["how"] == "latency" and kwargs["target_speedup"] == 1.5 and kwargs["target_ms"] is None
    assert kwargs["latency_fit"] == "within"
    recipe = build_recipe({}, ["prune.how=latency", "prune.target_ms=2", "prune.latency_fit=at_most"])
    kwargs = recipe.prune.prune_kwargs()
    assert kwargs["latency_fit"] == "at_most" and kwargs["target_ms"] == 2


def _round(error, budget=1.0, target=1.0, value=0.0):
    return {"budget_ms": budget, "target_ms": target, "pruned_ms": target * (1 + error), "error": error,
            "value": value}


def test_at_most_keeps_a_round_that_meets_the_target_over_a_closer_one_above_it():
    rounds = [_round(+0.01), _round(-0.09), _round(+0.07)]
    assert latency._keep(rounds, "within") == 0  # in the band
    assert latency._keep(rounds, "at_most") == 1  # none in the band: the only one at most the target
    assert latency._keep([_round(+0.03), _round(+0.01)], "at_most") == 1  # none meets it: the nearest
    assert latency._keep([_round(-0.12), _round(-0.07)], "at_most") == 1  # both meet it: nearest the aim


def test_of_the_rounds_in_the_band_the_plan_keeping_most_score_is_kept():
    rounds = [_round(+0.08, value=9.0), _round(-0.04, value=5.0), _round(-0.01, value=6.0), _round(-0.03, value=5.5)]
    assert latency._keep(rounds, "at_most") == 2  # not the first in the band, nor the nearest its middle
    assert latency._keep(rounds, "within") == 2  # the first, with more score, measured outside ±5 %
    rounds.append(_round(+0.04, value=7.0))
    assert latency._keep(rounds, "within") == 4 and latency._keep(rounds, "at_most") == 2


def test_next_budget_aims_at_the_middle_of_the_band():
    # One round: rescale so that the same model would land on the aim.
    assert latency._next_budget([_round(+0.10, budget=1.0)], aim=0.0) == pytest.approx(1 / 1.10)
    assert latency._next_budget([_round(+0.10, budget=1.0)], aim=-0.025) == pytest.approx(0.975 / 1.10)
    # Bracketing rounds: linear interpolation to where the error crosses the aim.
    rounds = [_round(+0.02, budget=1.0), _round(-0.08, budget=0.9)]
    assert latency._next_budget(rounds, aim=0.0) == pytest.approx(0.98)
    assert latency._next_budget(rounds, aim=-0.025) == pytest.approx(0.955)
    # Plans are discrete: a budget inside the bracket that repeats the plan under the aim narrows the
    # bracket, rather than the same budget coming back round after round.
    rounds = [_round(-0.072, budget=8.2), _round(+0.016, budget=8.6), _round(-0.072, budget=8.4)]
    assert 8.4 < latency._next_budget(rounds, aim=-0.025) < 8.6


def test_prune_refuses_latency_targets_for_other_modes():
    model = build_model("resnet20", 10).eval()
    with pytest.raises(InputError, match="target_speedup and target_ms are for how='latency'"):
        sd.prune(model, torch.randn(2, 3, 32, 32), how="percent", target_speedup=2.0)
    with pytest.raises(InputError, match="exactly one of target_speedup and target_ms"):
        sd.prune(model, torch.randn(2, 3, 32, 32), how="latency")
    for how, target in [("latency", 2.0), ("percent", None)]:
        with pytest.raises(InputError, match="latency_fit must be one of within, at_most, got 'under'"):
            sd.prune(model, torch.randn(2, 3, 32, 32), how=how, target_speedup=target, latency_fit="under")


@pytest.mark.slow
@pytest.mark.parametrize("fit", ["within", "at_most"])
def test_resnet20_reaches_the_measured_speedup(tmp_path, monkeypatch, fit):
    # The correction loop's logic, not this machine's timing noise, is under test: the models it exports
    # and its per-layer table are "timed" by a deterministic stand-in: latency proportional to the size
    # of the ONNX model (its weights).
    def sized_timing(models, batch=1, threads=1, *args, **kwargs):
        sizes = [len(m) if isinstance(m, bytes) else Path(m).stat().st_size for m in models]
        return [ortbench.latency_stats([10 * size] * 3, batch, threads) for size in sizes]

    monkeypatch.setattr(latency.ortbench, "time_sessions", sized_timing)
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.data = torch.rand(bn.num_features)
    x = torch.randn(16, 3, 32, 32)
    pruned, plan = sd.prune(model, x, how="latency", target_speedup=1.5, round_to=8,
                            latency_table=tmp_path / "table.json", latency_fit=fit)
    notes = plan.notes["latency"]
    chosen = notes["chosen"]  # the correction loop's own final measurement
    assert notes["within_tolerance"] and notes["fit"] == fit and abs(chosen["speedup"] / 1.5 - 1) <= 0.06
    assert abs(chosen["error"]) <= latency.TOLERANCE
    if fit == "at_most":
        assert chosen["pruned_ms"] <= chosen["target_ms"] and chosen["speedup"] >= 1.5
    low, high = notes["band"]
    in_band = [r for r in notes["rounds"] if low <= r["error"] <= high]
    assert chosen["value"] == max(r["value"] for r in in_band)
    if fit == "within":  # the first round lands in the band (-3 %); a fill round's larger budget, at +3 %,
        first = notes["rounds"][0]  # keeps more score
        assert first in in_band and chosen["value"] > first["value"] and chosen["budget_ms"] > first["budget_ms"]
    assert plan.how == "latency" and plan.channels_kept < plan.channels_total
    assert all(g.kept % 8 == 0 or g.kept == g.channels for g in plan.groups)
    assert pruned(x).shape == (16, 10)


def test_a_target_beyond_the_smallest_widths_is_an_error_naming_what_they_reach(tmp_path, monkeypatch):
    # Timed by the same deterministic stand-in (latency ∝ ONNX file size): a 40× speedup is out of
    # reach of ResNet-20 at widths aligned to 8, so the loop ends on the smallest plan with one line.
    def sized_timing(models, batch=1, threads=1, *args, **kwargs):
        sizes = [len(m) if isinstance(m, bytes) else Path(m).stat().st_size for m in models]
        return [ortbench.latency_stats([10 * size] * 3, batch, threads) for size in sizes]

    monkeypatch.setattr(latency.ortbench, "time_sessions", sized_timing)
    model = build_model("resnet20", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(InputError, match=r"target_speedup 40.0 is out of reach; the fastest plan allowed .*"
                                         r"round_to 8, min_channels 1\) measures \d+\.\d\dx") as info:
        sd.prune(model, x, how="latency", target_speedup=40.0, round_to=8, latency_table=tmp_path / "t.json")
    assert "\n" not in str(info.value)


def test_auto_alignment_halves_while_the_target_is_out_of_reach(tmp_path, monkeypatch):
    # Same stand-in timing: ResNet-20's smallest plan at widths aligned to 16 is about 6x smaller than
    # the dense model, at 8 about 20x, so 10x is reached only once "auto" halves 16 to 8.
    def sized_timing(models, batch=1, threads=1, *args, **kwargs):
        sizes = [len(m) if isinstance(m, bytes) else Path(m).stat().st_size for m in models]
        return [ortbench.latency_stats([10 * size] * 3, batch, threads) for size in sizes]

    monkeypatch.setattr(latency.ortbench, "time_sessions", sized_timing)
    monkeypatch.setattr(sd.api, "simd_block", lambda: 16)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a table per alignment, in the default cache
    assert sd.api.auto_alignments() == [16, 8, 4]
    model = build_model("resnet20", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"round_to auto: .*target_speedup 10.0 is out of reach.*round_to 16.*"
                                         r"trying widths aligned to 8"):
        _, plan = sd.prune(model, x, how="latency", target_speedup=10.0, round_to="auto")
    assert plan.round_to == 8 and plan.notes["latency"]["within_tolerance"]
    assert any(g.kept % 16 for g in plan.groups) and all(g.kept % 8 == 0 for g in plan.groups)
    with pytest.raises(InputError, match=r"target_speedup 400.0 is out of reach.*round_to 4,"):
        with pytest.warns(UserWarning):
            sd.prune(model, x, how="latency", target_speedup=400.0, round_to="auto")
    with pytest.raises(InputError, match=r"out of reach.*round_to 16,"):  # a given table: one alignment
        sd.prune(model, x, how="latency", target_speedup=10.0, round_to="auto", latency_table=tmp_path / "t.json")


def test_the_smallest_plan_is_timed_twice_before_a_target_is_out_of_reach(tmp_path, monkeypatch):
    # Stand-in timing as above; once `slow` is set, the next pairs (dense, pruned) are timed in a slowed
    # stretch: the pruned model 3x slower, for every block of one round. Every round plans the smallest widths.
    slow = []

    def sized_timing(models, batch=1, threads=1, *args, **kwargs):
        sizes = [len(m) if isinstance(m, bytes) else Path(m).stat().st_size for m in models]
        stats = [10 * size for size in sizes]
        if len(models) == 2 and slow:
            stats[1] *= slow.pop()
        return [ortbench.latency_stats([s] * 3, batch, threads) for s in stats]

    monkeypatch.setattr(latency.ortbench, "time_sessions", sized_timing)
    monkeypatch.setattr(latency, "choose_widths", lambda cost, choices, budget: [c.widths[0] for c in choices])
    model = build_model("resnet20", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    table = tmp_path / "t.json"
    with pytest.raises(InputError, match=r"measures (\d+\.\d+)x") as info:
        sd.prune(model, x, how="latency", target_speedup=400.0, round_to=8, latency_table=table)
    floor = float(re.search(r"measures (\d+\.\d+)x", str(info.value)).group(1))
    slow.extend([3.0] * 5)  # ortbench.time_quietest's blocks
    _, plan = sd.prune(model, x, how="latency", target_speedup=0.98 * floor, round_to=8, latency_table=table)
    first, second = plan.notes["latency"]["rounds"][:2]
    assert first["error"] > 1 and abs(second["error"]) < latency.TOLERANCE  # the retime, not the slow one, counts
    assert plan.notes["latency"]["chosen"] == second and plan.notes["latency"]["within_tolerance"]
