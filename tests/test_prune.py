"""Channel plans and physical pruning across residual additions and concatenations."""

import copy

import pytest
import torch

from slimdeploy.bn import affine_bns
from slimdeploy.export import export_onnx, verify_onnx
from slimdeploy.graph import build_graph, channel_groups
from slimdeploy.plan import ChannelPlan, GroupPlan, make_plan, zero_channels
from slimdeploy.prune import BiasMap, apply_plan, layer_widths, mask_plan, rebuild_pruned, zero_removed_gammas

from helpers import trained_like

SHAPE = (3, 32, 32)


def _plan(model, name, **prune):
    groups = channel_groups(model, build_graph(model, torch.randn(1, *SHAPE)))
    scores = {n: bn.weight.detach().abs() for n, bn in affine_bns(model).items()}
    kwargs = {"how": "percent", "amount": 0.5, **prune}
    return groups, make_plan(groups, scores, **kwargs, model_name=name, num_classes=10, input_shape=SHAPE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg19", "resnet56", "resnet164", "densenet40"])
def test_pruned_model_runs_and_exports_identically(name, tmp_path):
    dense = trained_like(name)
    _, plan = _plan(dense, name)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    assert 0.4 < 1 - plan.channels_kept / plan.channels_total <= 0.5
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    x = torch.randn(8, *SHAPE)
    check = verify_onnx(pruned, export_onnx(pruned, tmp_path / "p.onnx", SHAPE), x)
    assert check.max_abs_diff <= 1e-4 * check.max_abs_logit


@pytest.mark.parametrize("name", [pytest.param("vgg11", marks=pytest.mark.slow), "resnet20",
                                  pytest.param("densenet40", marks=pytest.mark.slow)])
def test_pruned_equals_masked(name):
    """Zeroing γ, β of the removed channels (the papers' masking) and removing them compute the same
    function wherever the removed channels are read only through BNs: post-activation VGG/ResNet
    (a whole residual stream goes together) and pre-activation DenseNet (every consumer of a
    concatenated channel starts with BN)."""
    dense = trained_like(name)
    groups, plan = _plan(dense, name)
    masked = mask_plan(copy.deepcopy(dense), groups, plan)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        ref, out, orig = masked(x), pruned(x), dense(x)
    assert (ref - orig).abs().max() > 1e-3  # the mask really changed the function
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_residual_stream_is_one_group():
    model = trained_like("resnet20")
    groups = channel_groups(model, build_graph(model, torch.randn(1, *SHAPE)))
    stream = [g for g in groups if g.root == "conv1"]
    assert stream, [g.root for g in groups]
    bn_names = {s.name for s in stream[0].bns}
    # the stem BN and the last BN of every first-stage block share the stream's channels
    assert "bn1" in bn_names and sum(".bn2" in n for n in bn_names) >= 3


def test_no_layer_reaches_zero_channels():
    model = trained_like("resnet20")
    _, plan = _plan(model, "resnet20", amount=0.99, min_channels=2)
    assert all(g.kept >= 2 for g in plan.groups)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert min(layer_widths(pruned).values()) >= 2
    assert pruned(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_round_to_gives_multiples():
    model = trained_like("vgg11")
    _, plan = _plan(model, "vgg11", amount=0.6, round_to=8)
    assert all(g.kept % 8 == 0 for g in plan.groups)
    pruned = apply_plan(copy.deepcopy(model), plan)
    widths = layer_widths(pruned)
    assert all(w % 8 == 0 for n, w in widths.items() if n != "classifier")


def test_plan_modes_threshold_and_zeros():
    model = trained_like("resnet20")
    for m in list(model.modules())[:12]:
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data[:3] = 0
    _, zeros = _plan(model, "resnet20", how="zeros")
    assert 0 < zeros.channels_total - zeros.channels_kept
    _, thr = _plan(model, "resnet20", how="threshold", amount=0.05)
    assert (zeros.channels_total - zeros.channels_kept) <= (thr.channels_total - thr.channels_kept)


@pytest.mark.slow
def test_plan_json_rebuilds_identical_model(tmp_path):
    dense = trained_like("resnet56")
    _, plan = _plan(dense, "resnet56")
    pruned = apply_plan(copy.deepcopy(dense), plan)
    plan.to_json(tmp_path / "plan.json")
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    state = torch.load(tmp_path / "pruned.pt", weights_only=True)
    rebuilt = rebuild_pruned(ChannelPlan.from_json(tmp_path / "plan.json"), state).eval()
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))
    assert layer_widths(rebuilt) == layer_widths(pruned)


@pytest.mark.slow
@pytest.mark.parametrize("name, exact", [("vgg11", True), ("resnet20", True), ("densenet40", True),
                                         ("resnet164", False)])
def test_compensation_reproduces_the_gamma_zeroed_model(name, exact):
    """With compensation the pruned model computes what the trained model with the removed γ set to
    zero computes (β kept): exactly wherever every read of a removed channel goes through a BN (borders
    included, by bias maps); ResNet-164's 1×1 shortcut reads the stream raw, so there only closely.
    The interior-only bias is in between, and no compensation is far off."""
    dense = trained_like(name)
    for m in dense.modules():  # BN shifts large enough that dropping them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data = torch.randn(m.num_features) * 0.5
    _, plan = _plan(dense, name)
    torch.manual_seed(1)
    calib, x = torch.randn(32, *SHAPE), torch.randn(8, *SHAPE)
    zeroed = zero_removed_gammas(copy.deepcopy(dense), plan)
    plain = apply_plan(copy.deepcopy(dense), plan)
    compensated = apply_plan(copy.deepcopy(dense), plan, calibration=calib)
    interior = apply_plan(copy.deepcopy(dense), plan, calibration=calib, exact=False)
    with torch.no_grad():
        ref = zeroed(x)
        err_plain = (plain(x) - ref).abs().max()
        err_comp = (compensated(x) - ref).abs().max()
        err_interior = (interior(x) - ref).abs().max()
    assert err_comp < 0.5 * err_plain, (float(err_comp), float(err_plain))
    if exact:
        assert err_comp <= 1e-5 * ref.abs().max(), float(err_comp)
        assert err_comp < err_interior < err_plain
    assert not any(isinstance(m, BiasMap) for m in interior.modules())
    assert any(isinstance(m, BiasMap) for m in compensated.modules())


def test_compensation_is_exact_without_padding():
    """1×1 convs and linear layers see no borders: there the compensation is exact."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 1, bias=False), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3),
    ).eval()
    for bn in (net[1], net[4]):
        bn.bias.data = torch.randn(bn.num_features)
        bn.running_var.data = torch.rand(bn.num_features) + 0.5
    plan = ChannelPlan("none", 3, [3, 8, 8], "percent", [GroupPlan("0", 8, [1, 4, 6], ["1"]),
                                                          GroupPlan("3", 6, [0, 5], ["4"])])
    zeroed = zero_removed_gammas(copy.deepcopy(net), plan)
    pruned = apply_plan(copy.deepcopy(net), plan, calibration=torch.randn(4, 3, 8, 8))
    assert plan.biased == ["3"]
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compensated_plan_rebuilds(tmp_path):
    dense = trained_like("resnet20")
    _, plan = _plan(dense, "resnet20")
    pruned = apply_plan(copy.deepcopy(dense), plan, calibration=torch.randn(8, *SHAPE))
    assert plan.biased
    plan.to_json(tmp_path / "plan.json")
    rebuilt = rebuild_pruned(ChannelPlan.from_json(tmp_path / "plan.json"), pruned.state_dict()).eval()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:regnet_x_400mf"])
def test_torchvision_models_prune_compensate_and_export(name, tmp_path):
    """Bottleneck/basic residual streams, depthwise and grouped convs: pruned without compensation
    equals the γ,β-masked model wherever BNs gate every read, compensation moves the pruned model
    towards the γ-zeroed one, and the export matches PyTorch."""
    dense = trained_like(name)
    groups, plan = _plan(dense, name, amount=0.4)
    x = torch.randn(2, *SHAPE)
    masked = mask_plan(copy.deepcopy(dense), groups, plan)
    plain = apply_plan(copy.deepcopy(dense), plan)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), masked(x), atol=1e-4, rtol=1e-4)
    compensated = apply_plan(copy.deepcopy(dense), plan, calibration=torch.randn(8, *SHAPE))
    zeroed = zero_removed_gammas(copy.deepcopy(dense), plan)
    with torch.no_grad():
        ref = zeroed(x)
        assert (compensated(x) - ref).abs().max() <= (plain(x) - ref).abs().max()
    assert plan.channels_kept < plan.channels_total
    check = verify_onnx(compensated, export_onnx(compensated, tmp_path / "m.onnx", SHAPE), x)
    assert check.max_abs_diff <= 1e-4 * check.max_abs_logit


@pytest.mark.parametrize("norm", [torch.nn.Identity(), torch.nn.BatchNorm2d(4, affine=False)])
def test_model_without_batchnorm_is_a_clear_error(norm):
    """No BN, or only BNs without γ: nothing for network slimming to score."""
    from slimdeploy.errors import ModelError

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), norm, torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    with pytest.raises(ModelError, match="no BatchNorm layer with a learnable γ") as err:  # exit code 2 at the CLI
        build_graph(net, torch.randn(1, *SHAPE))
    assert "\n" not in str(err.value)


def test_plan_with_unregularised_bns_and_rounding_bounds():
    model = trained_like("resnet20")
    groups = channel_groups(model, build_graph(model, torch.randn(1, *SHAPE)))
    scores = {n: bn.weight.detach().abs() for n, bn in affine_bns(model).items()
              if n != "bn1"}  # as with sparsity.exclude: [bn1]
    plan = make_plan(groups, scores, how="percent", amount=0.9, min_channels=10, round_to=8,
                     model_name="resnet20", num_classes=10, input_shape=SHAPE)
    assert all(g.kept >= min(10, g.channels) for g in plan.groups)
    untouched = make_plan(groups, scores, how="zeros", round_to=8, model_name="resnet20",
                          num_classes=10, input_shape=SHAPE)
    assert untouched.channels_kept == untouched.channels_total  # no zero scores: nothing goes


def test_exact_maps_come_from_the_zero_channels_alone():
    """Of two removed channels, one zero (γ = 0) and one that still varied, the map holds the zero
    one's exact contribution, borders included, and the other gives its interior bias: the result is
    what removing the varying channel alone by bias computes, the zero one being kept as it was."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 3, padding=1, bias=False)).eval()
    net[1].bias.data = torch.rand(4) + 0.5  # positive shifts: the removed channels pass the ReLU
    net[1].weight.data[1] = 0
    calib, x = torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8)
    both = ChannelPlan("none", 3, [3, 8, 8], "percent", [GroupPlan("0", 4, [1, 2], ["1"])])
    pruned = apply_plan(copy.deepcopy(net), both, calibration=calib, zero_channels={"0": [1]})
    assert both.bias_maps == {"3": [2, 8, 8]} and both.biased == ["3"]
    varying = ChannelPlan("none", 3, [3, 8, 8], "percent", [GroupPlan("0", 4, [2], ["1"])])
    reference = apply_plan(copy.deepcopy(net), varying, calibration=calib, exact=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=1e-5)
        assert (pruned(x) - zero_removed_gammas(copy.deepcopy(net), both)(x)).abs().max() > 1e-3


def test_zero_channels_need_every_coupled_bn_at_zero():
    """A channel is a zero only where every BN that sees it scores 0; a BN without a score (left out of
    the regularisation) still varies."""
    model = trained_like("resnet20")
    groups = channel_groups(model, build_graph(model, torch.randn(1, *SHAPE)))
    stream = next(g for g in groups if len(g.bns) > 1)  # a residual stream: several BNs per channel
    scores = {n: bn.weight.detach().abs() for n, bn in affine_bns(model).items()}
    first, rest = stream.bns[0], stream.bns[1:]
    scores[first.name] = scores[first.name].clone()
    scores[first.name][first.bn_idxs[:3]] = 0
    assert zero_channels(stream, scores) == []  # the other BNs still see those channels vary
    for slot in rest:
        scores[slot.name] = scores[slot.name].clone()
        scores[slot.name][[slot.bn_idxs[slot.root_idxs.index(r)] for r in first.root_idxs[:3]]] = 0
    assert zero_channels(stream, scores) == sorted(first.root_idxs[:3])
    del scores[rest[0].name]
    assert zero_channels(stream, scores) == []


def test_interior_bias_is_exact_away_from_the_borders():
    """Without bias maps, a removed channel's constant reaches a zero-padded 3×3 conv as the bias it adds
    away from the borders: exact inside, off where the padding cuts the kernel."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 3, padding=1, bias=False)).eval()
    net[1].bias.data = torch.rand(4) + 0.5  # positive shifts: the removed channels pass the ReLU
    plan = ChannelPlan("none", 3, [3, 8, 8], "percent", [GroupPlan("0", 4, [1, 2], ["1"])])
    zeroed = zero_removed_gammas(copy.deepcopy(net), plan)
    pruned = apply_plan(copy.deepcopy(net), plan, calibration=torch.randn(4, 3, 8, 8), exact=False)
    assert plan.biased == ["3"] and not plan.bias_maps
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        got, expected = pruned(x), zeroed(x)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-5)
    assert (got[..., 0, :] - expected[..., 0, :]).abs().min() > 1e-3  # the padding cut these reads
