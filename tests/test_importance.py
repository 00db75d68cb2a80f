import pytest
import torch
from torch import nn

import slimdeploy as sd
from slimdeploy.errors import InputError
from slimdeploy.graph import build_graph, channel_groups
from slimdeploy.importance import group_norm_scores
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


@pytest.mark.parametrize("importance, goes", [("bn", 7), ("group_norm", 5)])
def test_the_importance_decides_which_channel_goes(importance, goes):
    model = two_convs_with_a_hollow_channel(hollow=5)
    _, plan = sd.prune(model, torch.randn(2, 3, 8, 8), how="percent", amount=1 / 12, importance=importance)
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


def test_resnet20_prunes_by_group_norm_to_a_working_model():
    model = trained_like("resnet20")
    x = torch.randn(4, 3, 32, 32)
    pruned, plan = sd.prune(model, x, how="percent", amount=0.3, importance="group_norm")
    assert plan.channels_kept < plan.channels_total and pruned(x).shape == (4, 10)
    _, by_gamma = sd.prune(model, x, how="percent", amount=0.3)
    assert [g.remove for g in plan.groups] != [g.remove for g in by_gamma.groups]


def test_an_unknown_importance_is_refused_by_name():
    with pytest.raises(InputError, match="importance must be one of bn, group_norm, got 'taylor'"):
        sd.prune(build_model("resnet20", 10).eval(), torch.randn(2, 3, 32, 32), importance="taylor")
    with pytest.raises(RecipeError, match="prune.importance: Input should be 'bn' or 'group_norm'"):
        build_recipe({}, ["prune.importance=taylor"])
    assert build_recipe({}, ["prune.importance=group_norm"]).prune.prune_kwargs()["importance"] == "group_norm"
    # group_norm scores are one value per group: summing them over its BNs would rank big streams higher
    with pytest.raises(InputError, match="score_reduce 'sum' applies to importance='bn'"):
        sd.prune(build_model("resnet20", 10).eval(), torch.randn(2, 3, 32, 32), importance="group_norm",
                 score_reduce="sum")
    with pytest.raises(RecipeError, match="prune.importance: group_norm already covers every layer of a group: "
                                          "leave score_reduce at max"):
        build_recipe({}, ["prune.score_reduce=sum", "prune.importance=group_norm"])
