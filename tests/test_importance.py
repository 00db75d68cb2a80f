import copy

import pytest
import torch
from torch import nn

import slimdeploy as sd
from slimdeploy.errors import InputError
from slimdeploy.graph import build_graph, channel_groups
from slimdeploy.importance import group_norm_scores, taylor_scores
from slimdeploy.models import build_model
from slimdeploy.recipe import RecipeError, build_recipe

from helpers import trained_like


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def two_convs_with_a_hollow_channel(hollow: int = 5) -> nn.Module:
    """Every weight 1, except that channel ``hollow`` of conv1 has no filter and conv2 does not read it,
    while its γ (2) is bn1's largest: |γ| keeps it first, its weights say it is worth least."""
    model = TwoConvs().eval()
    with torch.no_grad():
        for layer in (model.conv1, model.conv2, model.bn1, model.bn2):
            layer.weight.fill_(1.0)
        model.conv1.weight[hollow] = 0
        model.conv2.weight[:, hollow] = 0
        model.bn1.weight[hollow] = 2.0
        model.bn2.weight.fill_(3.0)  # bn2's channels rank above bn1's by |γ|
    return model


def gammas(model):
    return {name: m.weight.detach().abs() for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_group_norm_is_the_mean_squared_norm_over_the_coupled_layers_over_its_group_mean():
    model = two_convs_with_a_hollow_channel()
    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    groups = channel_groups(model, graph)
    scores = group_norm_scores(model, graph, groups, gammas(model))
    # By hand: per channel of bn1's group, Σw² of conv1's filter, of γ, and of conv2's input slice; their
    # mean over the three layers, divided by the mean over the channels.
    by_hand = torch.stack([model.conv1.weight.pow(2).sum((1, 2, 3)), model.bn1.weight.pow(2),
                           model.conv2.weight.pow(2).sum((0, 2, 3))]).mean(0).detach()
    assert torch.allclose(scores["bn1"], by_hand / by_hand.mean())
    by_hand = torch.stack([model.conv2.weight.pow(2).sum((1, 2, 3)), model.bn2.weight.pow(2),
                           model.fc.weight.pow(2).sum(0)]).mean(0).detach()
    assert torch.allclose(scores["bn2"], by_hand / by_hand.mean())


def labelled_batches(n: int, shape=(3, 8, 8), classes: int = 2, batch: int = 4, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *shape, generator=generator, dtype=dtype),
             torch.randint(classes, (batch,), generator=generator)) for _ in range(n)]


@pytest.mark.parametrize("importance, goes", [("bn", 7), ("group_norm", 5), ("taylor", 5)])
def test_the_importance_decides_which_channel_goes(importance, goes):
    model = two_convs_with_a_hollow_channel(hollow=5)
    taylor = iter(labelled_batches(2)) if importance == "taylor" else None  # any iterable, read once
    _, plan = sd.prune(model, torch.randn(2, 3, 8, 8), how="percent", amount=1 / 12, importance=importance,
                       taylor_batches=taylor)
    removed = {g.root: g.remove for g in plan.groups}
    assert removed == {"conv1": [goes], "conv2": []}  # |γ| ties at 1: the last goes; group norm finds the hollow one
    assert plan.notes["importance"] == importance


def test_channels_scoring_zero_still_go_first_and_unscored_bns_stay_unscored():
    model = two_convs_with_a_hollow_channel(hollow=5)
    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    groups = channel_groups(model, graph)
    scores = group_norm_scores(model, graph, groups, {"bn1": torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 1])})
    assert set(scores) == {"bn1"}
    assert scores["bn1"][3] == 0 and (scores["bn1"][[0, 1, 2, 4, 5, 6, 7]] > 0).all()
    _, plan = sd.prune(model, torch.randn(2, 3, 8, 8), scores={"bn1": torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 1])},
                       how="zeros", importance="group_norm")
    assert {g.root: g.remove for g in plan.groups} == {"conv1": [3], "conv2": []}


class TwoBranches(nn.Module):
    """Two conv-BN branches added into one stream that a third conv reads: one group of five layers."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = nn.Conv2d(4, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x)))
        return self.fc(torch.relu(self.bn_c(self.conv_c(x))).mean((2, 3)))


def test_a_residual_stream_ranks_by_all_its_layers_alike():
    torch.manual_seed(0)
    model = TwoBranches().eval()
    for bn in (model.bn_a, model.bn_b, model.bn_c):
        nn.init.uniform_(bn.weight, 0.1, 2.0)
    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    scores = group_norm_scores(model, graph, channel_groups(model, graph), gammas(model))
    by_hand = torch.stack([model.conv_a.weight.pow(2).sum((1, 2, 3)), model.bn_a.weight.pow(2),
                           model.conv_b.weight.pow(2).sum((1, 2, 3)), model.bn_b.weight.pow(2),
                           model.conv_c.weight.pow(2).sum((0, 2, 3))]).mean(0).detach()
    assert torch.allclose(scores["bn_a"], by_hand / by_hand.mean())
    assert torch.equal(scores["bn_a"], scores["bn_b"])  # one stream, one ranking


def _loss_with_channel_scaled(model, bns, channel: int, scale: float, batch) -> float:
    """The loss with channel ``channel`` of every BN in ``bns`` scaled by ``scale`` (γ and β alike)."""
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for name in bns:
            bn = scaled.get_submodule(name)
            bn.weight[channel] *= scale
            bn.bias[channel] *= scale
        return float(nn.functional.cross_entropy(scaled(batch[0]), batch[1]))


def test_taylor_is_the_squared_first_order_loss_change_of_removing_the_channel_from_its_whole_group():
    torch.manual_seed(0)
    model = TwoBranches().double().eval()
    for bn in (model.bn_a, model.bn_b, model.bn_c):
        nn.init.uniform_(bn.weight, 0.1, 2.0)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    batches = labelled_batches(3, dtype=torch.float64)
    graph = build_graph(model, batches[0][0][:1])
    scores = taylor_scores(model, channel_groups(model, graph), gammas(model), batches)
    # By brute force: removing channel c scales its γ and β in every coupled BN from 1 to 0; the first-order
    # loss change is the derivative along that path, here by central differences, squared per batch.
    eps = 1e-6
    for bns, channels in ((["bn_a", "bn_b"], 4), (["bn_c"], 2)):
        for c in range(channels):
            slopes = torch.tensor([(_loss_with_channel_scaled(model, bns, c, 1 + eps, b)
                                    - _loss_with_channel_scaled(model, bns, c, 1 - eps, b)) / (2 * eps)
                                   for b in batches], dtype=torch.float64)
            for name in bns:
                assert scores[name][c] == pytest.approx(float(slopes.pow(2).mean()), rel=1e-4)
    assert not model.bn_a.weight.requires_grad or model.bn_a.weight.grad is None  # the model is left untouched


def test_taylor_keeps_channels_scoring_zero_first_and_refuses_bad_batches():
    model = two_convs_with_a_hollow_channel(hollow=5)
    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    groups = channel_groups(model, graph)
    scores = taylor_scores(model, groups, {"bn1": torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 1])}, labelled_batches(2))
    assert set(scores) == {"bn1"} and scores["bn1"][3] == 0 and scores["bn1"][0] > 0
    with pytest.raises(InputError, match="taylor_batches is empty"):
        taylor_scores(model, groups, gammas(model), [])
    with pytest.raises(InputError, match="importance='taylor' needs taylor_batches"):
        sd.prune(model, torch.randn(2, 3, 8, 8), importance="taylor")
    with pytest.raises(InputError, match="taylor_batches is for importance='taylor', not importance='bn'"):
        sd.prune(model, torch.randn(2, 3, 8, 8), taylor_batches=labelled_batches(1))


def test_resnet20_prunes_by_taylor_to_a_working_model_ranked_unlike_gamma():
    model = trained_like("resnet20")
    x = torch.randn(4, 3, 32, 32)
    batches = labelled_batches(2, (3, 32, 32), classes=10)
    pruned, plan = sd.prune(model, x, how="percent", amount=0.3, importance="taylor", taylor_batches=batches)
    assert plan.channels_kept < plan.channels_total and pruned(x).shape == (4, 10)
    assert plan.notes["importance"] == "taylor"
    _, by_gamma = sd.prune(model, x, how="percent", amount=0.3)
    assert [g.remove for g in plan.groups] != [g.remove for g in by_gamma.groups]


def test_resnet20_prunes_by_group_norm_to_a_working_model():
    model = trained_like("resnet20")
    x = torch.randn(4, 3, 32, 32)
    pruned, plan = sd.prune(model, x, how="percent", amount=0.3, importance="group_norm")
    assert plan.channels_kept < plan.channels_total and pruned(x).shape == (4, 10)
    _, by_gamma = sd.prune(model, x, how="percent", amount=0.3)
    assert [g.remove for g in plan.groups] != [g.remove for g in by_gamma.groups]


def test_an_unknown_importance_is_refused_by_name():
    with pytest.raises(InputError, match="importance must be one of bn, group_norm, taylor, got 'hessian'"):
        sd.prune(build_model("resnet20", 10).eval(), torch.randn(2, 3, 32, 32), importance="hessian")
    with pytest.raises(RecipeError, match="prune.importance: Input should be 'bn', 'group_norm' or 'taylor'"):
        build_recipe({}, ["prune.importance=hessian"])
    assert build_recipe({}, ["prune.importance=group_norm"]).prune.prune_kwargs()["importance"] == "group_norm"
    with pytest.raises(RecipeError, match="prune.taylor_images: Input should be greater than or equal to 1"):
        build_recipe({}, ["prune.importance=taylor", "prune.taylor_images=0"])
    # group_norm scores are one value per group: summing them over its BNs would rank big streams higher
    with pytest.raises(InputError, match="score_reduce 'sum' applies to importance='bn'"):
        sd.prune(build_model("resnet20", 10).eval(), torch.randn(2, 3, 32, 32), importance="group_norm",
                 score_reduce="sum")
    with pytest.raises(RecipeError, match="prune.importance: group_norm already covers every layer of a group: "
                                          "leave score_reduce at max"):
        build_recipe({}, ["prune.score_reduce=sum", "prune.importance=group_norm"])
    with pytest.raises(RecipeError, match="prune.importance: taylor already covers every layer of a group"):
        build_recipe({}, ["prune.score_reduce=mean", "prune.importance=taylor"])
