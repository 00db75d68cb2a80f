"""The pruner comparison harness (benchmarks/pruner_comparison.py) on synthetic data: every kind of method
goes through the same loop to a measured target and gives a complete row."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from helpers import trained_like
from slimdeploy import ortbench
from slimdeploy.data import Normalize, make_synthetic

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"method", "library", "target", "accuracy_no_ft", "accuracy", "latency_ms", "speedup", "macs", "params"}


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("pruner_comparison", ROOT / "benchmarks" / "pruner_comparison.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sized_timing(monkeypatch):
    """Deterministic stand-in for onnxruntime timing: latency proportional to the ONNX file's size."""
    def timing(models, batch=1, *args, **kwargs):
        sizes = [len(m) if isinstance(m, bytes) else Path(m).stat().st_size for m in models]
        return [ortbench.latency_stats([1e-4 * size * batch] * 3, batch, 1) for size in sizes]

    monkeypatch.setattr(ortbench, "time_sessions", timing)


@pytest.fixture(scope="module")
def data(harness):
    synthetic = make_synthetic(train_size=96, test_size=32)
    return harness.Data(synthetic.train, synthetic.test, synthetic.test,
                        Normalize(synthetic.mean, synthetic.std, "cpu"), synthetic.input_shape)


@pytest.mark.slow
@pytest.mark.parametrize("name, grid", [("l1", [0.5, 1.0]), ("l1+group_norm", [1.0]), ("l1+taylor", [1.0]),
                                        ("l1+percent", [1.0]), ("proximal_l1_planned", [1.0]),
                                        ("bnscale", [1.0]), ("uniform", [1.0])])
def test_each_library_reaches_the_target_with_a_complete_row(harness, data, sized_timing, name, grid, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the latency table's cache
    dense = trained_like("resnet20")
    budget = harness.Budget(sparse_epochs=1, finetune_epochs=1, batch=32)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    rows = harness.run_method(dense, harness.METHODS[name], data, budget, targets=[1.3], grid=grid,
                              scratch_epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # the start stays untouched
    (row,) = rows
    assert ROW_KEYS <= row.keys() and row["method"] == name and row["target"] == 1.3
    widths = row["widths"]  # every conv's kept width, for comparing plans layer by layer
    assert widths.keys() == harness.layer_widths(dense).keys()
    assert all(w <= harness.layer_widths(dense)[k] for k, w in widths.items())
    assert sum(widths.values()) < sum(harness.layer_widths(dense).values())
    # the stand-in timing is exact, so every library meets the target (slimdeploy's latency_fit at_most)
    assert row["speedup"] >= 1.3 and row["macs"] < harness.count_macs(dense, data.shape)
    assert 0 <= row["accuracy"] <= 100
    for key in ("accuracy_no_ft", "accuracy_no_ft_bn"):
        assert row.get(key) is None if name == "uniform" else 0 <= row[key] <= 100
    if len(grid) > 1:  # the λ search ran on the validation split, over the whole grid
        assert [t["lam"] for t in row["search"]] == [harness.METHODS[name].lam * s for s in grid]
        assert row["lam"] in [t["lam"] for t in row["search"]]


def test_mcp_and_scad_reach_every_gamma_below_one(harness):
    for name in ("mcp", "scad"):
        kwargs = harness.sparsify_kwargs(harness.METHODS[name].with_lam(0.02))
        assert kwargs["a"] * kwargs["lam"] >= 1.0


def test_publish_fills_the_pruners_block_and_draws_the_pareto_plot(harness, tmp_path):
    rows = [{"method": m, "library": lib, "target": t, "accuracy_no_ft": no_ft, "accuracy": acc, "latency_ms": ms,
             "speedup": 1.0 / ms, "macs": 20e6, "params": 1e5,
             "timings": [{"batch": 1, "speedup": 1.0 / ms}, {"batch": 64, "speedup": 1.1 / ms}]}
            for m, lib, t, no_ft, acc, ms in [("l1", "slimdeploy", 1.5, 80.0, 88.5, 0.66),
                                              ("bnscale", "torch-pruning", 1.5, 10.0, 89.25, 0.65),
                                              ("uniform", "uniform", 1.5, None, 87.0, 0.67)]]
    rows[1]["accuracy_no_ft_bn"] = 40.0
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- pruners:begin -->\nstale\n<!-- pruners:end -->\noutro\n")
    harness.publish(rows, doc, tmp_path / "pareto.png")
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    lines = [line for line in text.splitlines() if line.startswith("| 1.5×")]
    assert [line.split(" | ")[1] for line in lines] == ["bnscale", "l1", "uniform"]  # best accuracy first
    assert "| 10.00 | 40.00 | 89.25 | 0.650 | 1.54× | 1.69× |" in lines[0] and "| – | – | 87.00 |" in lines[2]
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_publish_refuses_a_document_without_the_pruners_block(harness, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("hand-written results\n")
    with pytest.raises(SystemExit, match="results.md: needs a block between <!-- pruners:begin -->"):
        harness.publish([], doc, tmp_path / "pareto.png")
    assert doc.read_text() == "hand-written results\n" and not (tmp_path / "pareto.png").exists()


def test_lambda_search_passes_over_a_lambda_that_cannot_reach_the_target(harness, data, monkeypatch):
    """The first λ raising (target out of reach) must not block a later one that scores."""
    def prune_to(model, trial, handle, data, target, round_to):
        if trial.lam < 0.1:
            raise harness.SlimdeployError("out of reach")
        return model, {}

    monkeypatch.setattr(harness, "regularised", lambda dense, trial, *args: (f"model {trial.lam:g}", None))
    monkeypatch.setattr(harness, "prune_to", prune_to)
    monkeypatch.setattr(harness, "recalibrated", lambda model, *args: model)
    monkeypatch.setattr(harness, "top1", lambda model, *args: 50.0 if model == "model 0.3" else 40.0)
    method, model, _, trials = harness.search_lam(None, harness.METHODS["l1"], data, harness.Budget(), [0.3, 1.0, 3.0],
                                                  1.3)
    # 0.3 won at the grid's top end, so one step past it (0.9) was tried, and lost
    assert [t["lam"] for t in trials] == pytest.approx([0.03, 0.1, 0.3, 0.9])
    assert method.lam == pytest.approx(0.3) and model == "model 0.3"


@pytest.mark.parametrize("peak, tried", [(0.01, [0.03, 0.1, 0.3, 0.009, 0.0027]),  # found past the low end
                                         (0.1, [0.03, 0.1, 0.3]),  # inside the grid: nothing more
                                         (1e-9, [0.03, 0.1, 0.3, 0.009, 0.0027, 0.00081])])  # bounded
def test_lambda_search_steps_past_an_end_of_the_grid_while_it_wins(harness, data, monkeypatch, peak, tried):
    import math

    monkeypatch.setattr(harness, "MAX_TRIALS", 6)
    monkeypatch.setattr(harness, "regularised", lambda dense, trial, *args: (trial.lam, None))
    monkeypatch.setattr(harness, "prune_to", lambda model, *args: (model, {}))
    monkeypatch.setattr(harness, "recalibrated", lambda model, *args: model)
    # validation accuracy peaks at λ = peak, falling with the distance in log λ
    monkeypatch.setattr(harness, "top1", lambda lam, *args: 90 - abs(math.log(lam / peak)))
    method, _, _, trials = harness.search_lam(None, harness.METHODS["l1"], data, harness.Budget(), [1.0, 3.0, 0.3],
                                              1.3)
    assert [t["lam"] for t in trials] == pytest.approx(tried)
    best = max(tried, key=lambda lam: -abs(math.log(lam / peak)))
    assert method.lam == pytest.approx(best)


def test_trial_cache_reuses_a_trained_trial(harness, data, tmp_path, monkeypatch):
    """A rerun loads the sparse-trained model and its scores instead of training again."""
    dense = trained_like("resnet20")
    cache = harness.TrialCache(tmp_path, "digest")
    method, budget = harness.METHODS["l1"].with_lam(0.05), harness.Budget(sparse_epochs=1, batch=32)
    calls = []

    def regularised(dense, method, data, budget):
        calls.append(method.lam)
        model = trained_like("resnet20", seed=1)
        return model, {"bn1": model.bn1.weight.detach().abs()}

    monkeypatch.setattr(harness, "regularised", regularised)
    first, first_scores = harness.sparse_trained(dense, method, data, budget, cache)
    again, again_scores = harness.sparse_trained(dense, method, data, budget, cache)
    assert calls == [0.05]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    assert torch.equal(first_scores["bn1"], again_scores["bn1"])
    harness.sparse_trained(dense, method.with_lam(0.1), data, budget, cache)  # another λ is another trial
    harness.sparse_trained(dense, method, data, harness.Budget(sparse_epochs=2, batch=32), cache)
    assert calls == [0.05, 0.1, 0.05]
    # a variant that only ranks channels differently shares its base method's trainings
    harness.sparse_trained(dense, harness.METHODS["l1+group_norm"].with_lam(0.05), data, budget, cache)
    assert calls == [0.05, 0.1, 0.05]
    harness.sparse_trained(dense, harness.METHODS["proximal_l1+group_norm"].with_lam(0.05), data, budget, cache)
    assert calls == [0.05, 0.1, 0.05, 0.05]


def test_ratio_bisection_keeps_the_fastest_model_when_none_reaches_the_target(harness, monkeypatch):
    """Past the ratio that rounds a layer to 0 channels Torch-Pruning leaves the layer whole, so the most
    pruned ratio tried is not the fastest: a missed target falls back on the fastest model tried."""
    class Pruner:
        def __init__(self, model, ratio):
            self.model, self.ratio = model, ratio

        def step(self):
            self.model.ratio = self.ratio

    def speedup(dense, model, *args, **kwargs):  # rises to 1.8x at ratio 0.5, then falls back towards dense
        return [{"speedup": 1 + 1.6 * model.ratio if model.ratio <= 0.5 else 1.1}]

    monkeypatch.setattr(harness, "tp_pruner", lambda model, example, kind, ratio, round_to: Pruner(model, ratio))
    monkeypatch.setattr(harness, "speedups", speedup)
    dense = torch.nn.Identity()
    model, ratio, measured = harness.prune_by_ratio_to(dense, torch.zeros(1, 3, 8, 8), "magnitude", 2.0, round_to=8)
    assert (ratio, model.ratio, measured) == (0.475, 0.475, 1 + 1.6 * 0.475)  # every ratio tried later is > 0.5
    model, ratio, measured = harness.prune_by_ratio_to(dense, torch.zeros(1, 3, 8, 8), "magnitude", 1.5, round_to=8)
    assert measured >= 1.5 and ratio < 0.35  # reached: the smallest ratio that meets the target


def test_a_slimdeploy_target_out_of_reach_falls_back_on_the_smallest_widths(harness, data, sized_timing,
                                                                            tmp_path, monkeypatch):
    """As the ratio bisection keeps the fastest model tried, a latency target beyond the smallest widths
    (here 50x, by the exact stand-in timing) prunes every group to its smallest aligned width."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dense = trained_like("resnet20")
    pruned, notes = harness.prune_to(dense, harness.METHODS["l1"], None, data, 50.0, round_to=8)
    assert notes == {"plan_speedup": None, "fallback": "smallest widths"}
    widths = harness.layer_widths(pruned)
    assert widths.pop("fc") == 10 and set(widths.values()) == {8}


@pytest.mark.slow
def test_a_planned_method_trains_toward_each_targets_plan_and_prunes_by_it(harness, data, sized_timing, tmp_path,
                                                                           monkeypatch):
    """One plan per target, made on the dense model; its trainings are cached per plan; the rows are pruned
    by the plan they trained toward, whose channels (and no others) the penalty drove to exact zeros."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dense = trained_like("resnet20")
    budget = harness.Budget(sparse_epochs=1, finetune_epochs=0, batch=32)
    cache = harness.TrialCache(tmp_path / "trials", "digest")
    method = harness.METHODS["proximal_l1_planned"].with_lam(1e3)  # strong enough to zero them in 3 steps
    plans = {t: harness.planned(dense, method, data, budget, t, cache) for t in (1.3, 1.6)}
    assert plans[1.6].channels_kept < plans[1.3].channels_kept
    assert harness.planned(dense, method, data, budget, 1.3, cache).to_dict() == plans[1.3].to_dict()  # cached
    for target, plan in plans.items():
        toward = harness.replace(method, toward=plan)
        model, scores = harness.sparse_trained(dense, toward, data, budget, cache)
        removed = harness.sd.api.plan_bn_channels(model, plan)
        assert {name: (xi == 0).nonzero().flatten().tolist() for name, xi in scores.items()} == removed
        pruned, _ = harness.prune_to(model, toward, scores, data, target, budget.round_to)
        by_plan, _ = harness.sd.prune(dense, torch.randn(1, *data.shape), plan=plan)
        assert harness.layer_widths(pruned) == harness.layer_widths(by_plan) != harness.layer_widths(dense)
    assert len(list((tmp_path / "trials").glob("proximal_l1_planned_*.pt"))) == 2
