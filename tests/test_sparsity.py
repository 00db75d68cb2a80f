"""Sparsifiers: the subgradient step, the proximal NS splitting, prox-SGD, and their state."""

import pytest
import torch
from torch import nn

from slimdeploy import penalties
from slimdeploy.bn import is_affine_bn
from slimdeploy.data import Normalize, make_synthetic
from slimdeploy.graph import build_graph, channel_groups
from slimdeploy.models import build_model
from slimdeploy.plan import make_plan
from slimdeploy.prune import apply_plan
from slimdeploy.recipe import FinetuneCfg, build_recipe
from slimdeploy.results import ProximalSummary
from slimdeploy.sparsity import (
    SPARSIFIERS,
    ProximalSparsifier,
    ProxSGDSparsifier,
    Sparsifier,
    SubgradientSparsifier,
    make_sparsifier,
    select_bns,
)
from slimdeploy.train import evaluate, train


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6))


def test_select_bns_patterns():
    net = _net()
    assert list(select_bns(net)) == ["1", "4"]
    assert list(select_bns(net, include=["4"])) == ["4"]
    assert list(select_bns(net, exclude=["1"])) == ["4"]


def test_only_bns_with_a_gamma_are_selected():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 6, 3),
                        nn.BatchNorm2d(6), nn.InstanceNorm2d(6, affine=True), nn.Flatten(), nn.Linear(6, 4),
                        nn.BatchNorm1d(4))
    assert list(select_bns(net)) == ["4", "8"]
    assert not is_affine_bn(net[1]) and not is_affine_bn(net[5]) and is_affine_bn(net[8])


def test_subgradient_adds_penalty_gradient_to_every_gamma():
    net = _net()
    pen = penalties.get("tl1", 0.3, a=1.0)
    sp = SubgradientSparsifier(net, pen)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    before = [net[1].weight.grad.clone(), net[4].weight.grad.clone()]
    sp.before_step()
    for bn, g0 in zip((net[1], net[4]), before):
        torch.testing.assert_close(bn.weight.grad, g0 + pen.grad(bn.weight.detach()))


def test_proximal_update_follows_the_splitting():
    net = _net()
    pen = penalties.get("l1", 0.5)
    sp = ProximalSparsifier(net, pen, beta=2.0)
    gamma0 = [net[1].weight.detach().clone(), net[4].weight.detach().clone()]
    xi0 = [x + 0.1 for x in gamma0]
    for x, x0 in zip(sp.xi, xi0):
        x.copy_(x0)
    lr = 0.25
    sp.after_step(lr)
    alpha, beta = 1 / lr, 2.0
    for bn, g0, x0, x1 in zip((net[1], net[4]), gamma0, xi0, sp.xi):
        g1 = (alpha * g0 + beta * x0) / (alpha + beta)
        torch.testing.assert_close(bn.weight.detach(), g1)
        torch.testing.assert_close(x1, pen.prox((alpha * x0 + beta * g1) / (alpha + beta), 1 / (alpha + beta)))


def test_prox_sgd_applies_prox_with_lr():
    net = _net()
    pen = penalties.get("mcp", 0.4, a=3.0)
    g0 = net[1].weight.detach().clone()
    ProxSGDSparsifier(net, pen).after_step(0.5)
    torch.testing.assert_close(net[1].weight.detach(), pen.prox(g0, 0.5))


def test_proximal_state_roundtrip():
    net = _net()
    cfg = dict(method="proximal", penalty="scad", lam=0.1, a=3.7, beta=1.0)
    sp = make_sparsifier(net, **cfg)
    sp.after_step(0.1)
    state = sp.state_dict()
    other = make_sparsifier(_net(), **cfg)
    other.load_state_dict(state)
    for a, b in zip(sp.xi, other.xi):
        assert torch.equal(a, b)


def test_summary_counts_the_exact_zeros_of_xi_and_is_none_without_xi():
    net = _net()
    with torch.no_grad():
        net[1].weight.uniform_(0.1, 1.0)
    sp = make_sparsifier(net, "proximal", "l1", 0.1, beta=1.0)
    sp.xi[0][:3] = 0  # three channels of the first BN, whose γ stay as they were
    gamma = net[1].weight.detach()[:3]
    assert sp.summary() == ProximalSummary(
        xi_zeros=3, channels=8 + 6, gamma_nonzero_at_xi_zero=3, gamma_max_abs_at_xi_zero=float(gamma.max()),
        gamma_mean_abs_at_xi_zero=float(gamma.mean()))
    for name in set(SPARSIFIERS.names()) - {"proximal"}:
        assert make_sparsifier(_net(), name, "l1", 0.1).summary() is None, name


@pytest.mark.slow
def test_proximal_ns_reaches_exact_zeros_and_pruning_them_keeps_accuracy():
    """Proximal NS on a small seeded synthetic run: a good share of ξ becomes exactly 0, and removing
    exactly those channels (no threshold, no fine-tuning; BN-bias compensation on) moves test accuracy
    by at most one point."""
    torch.set_num_threads(1)  # bit-reproducible on any core count
    data = make_synthetic(num_classes=4, image_size=16, train_size=512, test_size=256, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet20", 4, bn_init=0.2)
    norm = Normalize(data.mean, data.std, "cpu")
    sp = make_sparsifier(model, "proximal", "l1", 0.3, beta=300.0)
    cfg = FinetuneCfg(epochs=10, lr=0.1, schedule="cosine")
    res = train(model, data, cfg, batch_size=16, eval_batch_size=256, augment=False, normalize=norm,
                sparsifier=sp, seed=0, progress=False)
    summary = sp.zero_summary()
    assert summary["xi_zeros"] >= 0.3 * summary["channels"], summary
    assert summary["gamma_max_abs_at_xi_zero"] < 0.01, summary
    model.eval()
    groups = channel_groups(model, build_graph(model, torch.randn(1, 3, 16, 16)))
    plan = make_plan(groups, sp.scores(), how="zeros", model_name="resnet20", num_classes=4,
                     input_shape=(3, 16, 16))
    assert plan.channels_kept <= 0.7 * plan.channels_total
    pruned = apply_plan(model, plan, calibration=norm(data.train.images[:64]))
    acc_pruned = evaluate(pruned, data.test, norm, 256)
    assert res.accuracy > 60
    assert abs(acc_pruned - res.accuracy) <= 1.0, (res.accuracy, acc_pruned)


class ScaledSubgradient(Sparsifier):
    """A sparsifier with an option of its own, read from make_sparsifier's options."""

    method = "scaled"
    uses_penalty = True

    def __init__(self, model, penalty, scale, include=(), exclude=()):
        super().__init__(model, penalty, include, exclude)
        self.scale = scale

    @classmethod
    def from_options(cls, model, penalty, *, beta, include=(), exclude=()):
        return cls(model, penalty, beta * 2, include, exclude)


def test_a_registered_sparsifier_is_built_by_its_own_from_options():
    SPARSIFIERS.register("scaled")(ScaledSubgradient)
    try:
        recipe = build_recipe({}, ["sparsity.method=scaled", "sparsity.beta=3"])
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        sparsifier = make_sparsifier(model, **recipe.sparsity.model_dump())
    finally:
        SPARSIFIERS.unregister("scaled")
    assert isinstance(sparsifier, ScaledSubgradient) and sparsifier.scale == 6.0
    assert isinstance(sparsifier.penalty, penalties.L1Penalty)



@pytest.mark.parametrize("name", SPARSIFIERS.names())
def test_every_sparsifier_is_built_as_registered(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    sparsifier = make_sparsifier(model, name, "tl1", 0.1, beta=5.0)
    assert type(sparsifier) is SPARSIFIERS.get(name) and sparsifier.method == name
    assert (sparsifier.penalty is not None) == sparsifier.uses_penalty == (name != "none")
    make_sparsifier(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), name).load_state_dict(
        sparsifier.state_dict())


def test_a_registered_sparsifier_without_channels_refuses_them_in_one_line():
    SPARSIFIERS.register("scaled")(ScaledSubgradient)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        with pytest.raises(ValueError, match="sparsity method 'scaled' cannot put its penalty on chosen channels"):
            make_sparsifier(model, "scaled", channels={"1": [0]})
    finally:
        SPARSIFIERS.unregister("scaled")
