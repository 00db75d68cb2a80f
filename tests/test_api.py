"""The library API (``import slimdeploy as sd``): optimizer hooks, the prune façade, save/load, export."""

import copy
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import slimdeploy as sd
from slimdeploy import api, penalties
from slimdeploy.errors import InputError, ModelError
from slimdeploy.prune import BiasMap

from helpers import ROOT, prune_from_zeros, trained_like


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU6(), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class Net(nn.Module):
    """Depthwise convs, a residual add and a Linear head: the shape of a small mobile network."""

    def __init__(self, width=16, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def make_net():
    return Net()


def gammas(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def one_step(model, optimizer, scaler=None):
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    own_loop, plan_first = (re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S).group(1)
                            for name in ("own-loop", "plan-first"))
    checks = """
x = images[:4]
assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
torch.testing.assert_close(reloaded.eval()(x), pruned.eval()(x))
assert plan.channels_kept < plan.channels_total
"""
    # the plan-first snippet continues the example: its pruned model computes what the trained model does
    plan_first_checks = """
assert plan.channels_kept < plan.channels_total
planned = slimdeploy.api.plan_bn_channels(model, plan)
assert all((bn.weight[planned[name]] == 0).all() for name, bn in model.named_modules() if name in planned)
torch.testing.assert_close(pruned.eval()(x), model.eval()(x))
print("CHECKS OK")
"""
    script = tmp_path / "example.py"
    script.write_text(own_loop + checks + "import slimdeploy\n" + plan_first + plan_first_checks)
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CHECKS OK" in res.stdout
    assert re.search(r"pruned\.onnx: [0-9.]+ ms, [0-9.]+x", res.stdout), res.stdout


def test_subgradient_hook_adds_the_penalty_gradient_to_an_unchanged_loop():
    torch.manual_seed(0)
    hooked, plain = Net(), Net()
    plain.load_state_dict(hooked.state_dict())
    lam = 0.01
    opt_h = torch.optim.SGD(hooked.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1)
    sd.sparsify(hooked, opt_h, method="subgradient", penalty="l1", lam=lam)
    torch.manual_seed(1)
    one_step(hooked, opt_h)
    # the same step by hand: gradient plus λ·sign(γ) on every BN weight
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    opt_p.zero_grad()
    nn.functional.cross_entropy(plain(x), y).backward()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.grad += lam * m.weight.detach().sign()
    opt_p.step()
    for name, g in gammas(hooked).items():
        torch.testing.assert_close(g, gammas(plain)[name])


def test_proximal_hook_uses_the_lr_of_the_gamma_group_and_remove_detaches():
    torch.manual_seed(0)
    model = Net()
    bn_weights = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in model.parameters() if all(p is not w for w in bn_weights)]
    optimizer = torch.optim.SGD([{"params": others, "lr": 0.1}, {"params": bn_weights, "lr": 0.3}])
    handle = sd.sparsify(model, optimizer, method="proximal", penalty="l1", lam=0.5, beta=2.0)
    xi0 = [x.clone() for x in handle.xi]
    one_step(model, optimizer)
    # ξ ← prox_{p/(α+β)}((α·ξ + β·γ)/(α + β)) with the coupled γ and α = 1/lr of γ's own group (0.3)
    alpha, beta = 1 / 0.3, 2.0
    w = alpha / (alpha + beta)
    pen = penalties.get("l1", 0.5)
    for gamma, xi, x0 in zip(handle.gammas, handle.xi, xi0):
        expected = pen.prox(w * x0 + (1 - w) * gamma.detach(), 1 / (alpha + beta))
        torch.testing.assert_close(xi, expected, rtol=1e-5, atol=1e-6)
    handle.remove()
    before = [x.clone() for x in handle.xi]
    one_step(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, handle.xi))


@pytest.mark.parametrize("method", ["proximal", "subgradient", "prox_sgd"])
def test_a_penalty_on_some_channels_leaves_the_others_as_plain_training_would(method):
    """One step: the listed channels move as under the penalty on every channel, the rest as with none."""
    torch.manual_seed(0)
    model, everywhere, plain = Net(), Net(), Net()
    start = trained_like(Net()).state_dict()
    for m in (model, everywhere, plain):
        m.load_state_dict(start)
    channels = {"stem.1": [0, 3], "blocks.1.body.4": [5]}
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, everywhere, plain)]
    options = dict(method=method, penalty="l1", lam=0.4, beta=2.0)
    handle = api.make_sparsifier(model, **options, channels=channels).attach(opts[0])
    reference = api.make_sparsifier(everywhere, **options).attach(opts[1])
    for m, opt in zip((model, everywhere, plain), opts):
        torch.manual_seed(1)
        one_step(m, opt)
    assert set(handle.bns) == set(channels)  # BNs without a listed channel are not touched at all
    stepped, penalised, free = gammas(model), gammas(everywhere), gammas(plain)
    if method == "proximal":  # a listed channel whose ξ reached 0 has its γ held at 0 as well
        for name, xi in reference.scores().items():
            penalised[name][xi == 0] = 0
    for name, gamma in stepped.items():
        listed = torch.zeros_like(gamma, dtype=torch.bool)
        listed[channels.get(name, [])] = True
        torch.testing.assert_close(gamma[listed], penalised[name][listed])
        torch.testing.assert_close(gamma[~listed], free[name][~listed])
    if method == "proximal":  # ξ follows γ where no penalty acts
        for name, xi in zip(handle.bns, handle.xi):
            listed = torch.zeros_like(xi, dtype=torch.bool)
            listed[channels[name]] = True
            torch.testing.assert_close(xi[~listed], stepped[name][~listed])
            torch.testing.assert_close(xi[listed], reference.xi[list(reference.bns).index(name)][listed])
        assert any((xi == 0).any() for xi in handle.xi) and any((xi != 0).any() for xi in handle.xi)


def test_proximal_toward_a_plan_zeroes_exactly_its_channels_and_pruning_by_it_loses_nothing():
    """The workflow for a latency budget: plan on the trained model, drive that plan's channels to exact
    zeros while the rest adapts, then remove them: the pruned model computes what the trained one does."""
    torch.manual_seed(0)
    model = trained_like(Net())
    x = torch.randn(16, 3, 8, 8)
    _, plan = sd.prune(model, x, how="percent", amount=0.5, round_to=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle = sd.sparsify(model, optimizer, method="proximal", penalty="l1", lam=2.0, beta=10.0, plan=plan)
    model.train()
    for _ in range(60):
        one_step(model, optimizer)
    model.eval()
    removed = api.plan_bn_channels(model, plan)
    assert removed and set(handle.bns) == set(removed)
    for name, xi in handle.scores().items():
        assert (xi == 0).nonzero().flatten().tolist() == removed[name]  # those channels, and no other
    pruned, applied = sd.prune(model, x, scores=handle, plan=plan)
    assert [g.remove for g in applied.groups] == [g.remove for g in plan.groups]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    for name, bn in handle.bns.items():  # held at 0 with their ξ: no later layer can amplify what is left
        assert not bn.weight[removed[name]].any() and not bn.bias[removed[name]].any()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5 * float(model(x).abs().max()), rtol=0)
    # they output 0, so removing them needs no compensation, and no per-position map costs latency
    assert not applied.bias_maps and not any(isinstance(m, BiasMap) for m in pruned.modules())
    unadjusted, _ = sd.prune(model, x, scores=handle, plan=plan, compensate="none")
    with torch.no_grad():
        torch.testing.assert_close(unadjusted(x), model(x), atol=1e-5 * float(model(x).abs().max()), rtol=0)


def test_a_plan_for_another_architecture_is_refused_in_one_line():
    model, wider = trained_like(Net()), trained_like(Net(width=24))
    _, plan = sd.prune(wider, torch.randn(2, 3, 8, 8), amount=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for call in (lambda: sd.prune(model, torch.randn(2, 3, 8, 8), plan=plan),
                 lambda: sd.sparsify(model, optimizer, method="proximal", plan=plan)):
        with pytest.raises(InputError, match="plan: made for other channel groups than this model has") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"channels: stem.1 has 16 channels, got indices \[16\]"):
        api.make_sparsifier(model, "proximal", channels={"stem.1": [16]})
    with pytest.raises(ValueError, match="channels: 'head' is not a BN layer"):
        api.make_sparsifier(model, "proximal", channels={"head": [0]})


def test_gamma_missing_from_optimizer_is_one_line():
    model = Net()
    head_only = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"stem\.1\.weight \(BN γ\) is not in the optimizer"):
        sd.sparsify(model, head_only)


def test_grad_scaler_skipped_step_is_skipped_and_gradients_are_unscaled():
    torch.manual_seed(0)
    model, ref = Net(), Net()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    handle = sd.sparsify(model, opt, method="proximal", penalty="l1", lam=0.05, beta=1.0)
    handle_ref = sd.sparsify(ref, opt_ref, method="proximal", penalty="l1", lam=0.05, beta=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    torch.manual_seed(1)
    one_step(model, opt, scaler)  # scaled, then unscaled by the scaler before the hooks run
    torch.manual_seed(1)
    one_step(ref, opt_ref)
    for a, b in zip(handle.xi, handle_ref.xi):
        torch.testing.assert_close(a, b)
    # an inf gradient: the scaler skips the step, and the sparsifier with it
    xi = [x.clone() for x in handle.xi]
    g = [gm.detach().clone() for gm in handle.gammas]
    handle_sub = sd.sparsify(ref, opt_ref, method="subgradient", penalty="l1", lam=0.05)
    opt.zero_grad()
    (scaler.scale(model(torch.full((2, 3, 8, 8), float("inf")))).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(xi, handle.xi))
    assert all(torch.equal(a, b.detach()) for a, b in zip(g, handle.gammas))
    handle_sub.remove()


def test_sparsify_on_ddp_uses_plain_bn_names(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(Net())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = sd.sparsify(model, opt, method="subgradient", penalty="tl1", lam=0.01)
        one_step(model, opt)
        assert set(handle.scores()) == set(gammas(model.module))
        pruned, plan = sd.prune(model, torch.randn(2, 3, 8, 8), scores=handle, amount=0.3)
        assert not isinstance(pruned, nn.parallel.DistributedDataParallel)
    finally:
        dist.destroy_process_group()


def test_prune_leaves_the_input_alone_traces_once_and_matches_the_zeroed_model(monkeypatch):
    torch.manual_seed(0)
    model = trained_like(Net())
    state = copy.deepcopy(model.state_dict())
    traces = []
    real = api.build_graph
    monkeypatch.setattr(api, "build_graph", lambda *a, **k: traces.append(1) or real(*a, **k))
    x = torch.randn(16, 3, 8, 8)
    outcome = api.prune_with_record(model, x, amount=0.5)
    assert len(traces) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert outcome.plan.channels_kept < outcome.plan.channels_total
    assert outcome.plan.model == f"{__name__}:Net" and outcome.plan.num_classes == 5
    from_zeros = prune_from_zeros(model, x, amount=0.5)  # the removed γ set to 0 in ``model``
    with torch.no_grad():
        torch.testing.assert_close(from_zeros.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_prune_past_the_zeros_compensates_by_bias_alone():
    """Channels that still varied get their interior bias, no per-position map: a map would freeze a
    border pattern the trained network never computed. Channels that were zero keep their exact maps."""
    model = trained_like("resnet20")
    x = torch.randn(16, 3, 16, 16)
    exact, plan_exact = sd.prune(model, x, amount=0.5)
    bias, _ = sd.prune(model, x, amount=0.5, compensate="bias")
    assert not plan_exact.bias_maps and not any(isinstance(m, BiasMap) for m in exact.modules())
    with torch.no_grad():
        torch.testing.assert_close(exact(x), bias(x))
    zeros = prune_from_zeros(model, x, amount=0.5)
    assert zeros.plan.bias_maps and any(isinstance(m, BiasMap) for m in zeros.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(zeros.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_prune_scores_default_to_abs_gamma_and_accept_a_dict():
    torch.manual_seed(0)
    model = trained_like(Net())
    x = torch.randn(2, 3, 8, 8)
    default, plan_default = sd.prune(model, x, amount=0.4, compensate="none")
    scores = {n: g.abs() for n, g in gammas(model).items()}
    explicit, plan_explicit = sd.prune(model, x, scores=scores, amount=0.4, compensate="none")
    assert [g.remove for g in plan_default.groups] == [g.remove for g in plan_explicit.groups]
    inverted = {n: 1 / (s + 1e-3) for n, s in scores.items()}
    _, plan_inverted = sd.prune(model, x, scores=inverted, amount=0.4, compensate="none")
    assert [g.remove for g in plan_inverted.groups] != [g.remove for g in plan_default.groups]


def test_save_and_load_pruned_roundtrip_and_build_override(tmp_path):
    torch.manual_seed(0)
    model = trained_like(Net())
    x = torch.randn(4, 3, 8, 8)
    pruned, plan = sd.prune(model, x, amount=0.5, round_to=4)
    path = sd.save_pruned(tmp_path / "p.pt", pruned, plan)
    torch.testing.assert_close(sd.load_pruned(path).eval()(x), pruned(x))
    torch.testing.assert_close(sd.load_pruned(path, build=Net).eval()(x), pruned(x))
    # a plan naming a plain function needs build=: nothing named in a file is called on trust
    _, by_factory = sd.prune(model, x, amount=0.5, round_to=4, model_name=f"{__name__}:make_net")
    sd.save_pruned(tmp_path / "f.pt", pruned, by_factory)
    with pytest.raises(ModelError, match="pass build="):
        sd.load_pruned(tmp_path / "f.pt")
    torch.testing.assert_close(sd.load_pruned(tmp_path / "f.pt", build=f"{__name__}:make_net").eval()(x), pruned(x))
    torch.save({"state_dict": pruned.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a file written by save_pruned"):
        sd.load_pruned(tmp_path / "other.pt")


def test_export_onnx_verifies_and_returns_the_check(tmp_path):
    torch.manual_seed(0)
    model = trained_like(Net())
    x = torch.randn(4, 3, 8, 8)
    check = sd.export_onnx(model, tmp_path / "m.onnx", x)
    assert check.max_abs_diff <= 1e-4 * check.max_abs_logit
    assert sd.export_onnx(model, tmp_path / "n.onnx", x, verify=False) is None
    rows = sd.benchmark([tmp_path / "m.onnx", tmp_path / "n.onnx"], iters=3, warmup=1)
    assert [r["model"] for r in rows] == [str(tmp_path / "m.onnx"), str(tmp_path / "n.onnx")]
    assert rows[0]["speedup"] == 1.0 and rows[1]["p50"] > 0


def test_bad_calls_are_one_line():
    model = trained_like(Net())
    with pytest.raises(InputError, match="compensate must be one of exact, bias, none"):
        sd.prune(model, torch.randn(2, 3, 8, 8), compensate="all")
    with pytest.raises(ValueError, match="unknown plan mode"):
        sd.prune(model, torch.randn(2, 3, 8, 8), how="magic")
    with pytest.raises(ValueError, match="unknown penalty"):
        sd.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), penalty="l3")
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    no_bn(torch.randn(1, 3, 8, 8))
    with pytest.raises(ModelError, match="has no BatchNorm layer") as err:
        sd.prune(no_bn, torch.randn(1, 3, 8, 8))
    assert "\n" not in str(err.value)
