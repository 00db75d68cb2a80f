"""Tests for slimdeploy.models: construction, parameter counts, init, tracing and pruning."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from slimdeploy.models import (
    MODEL_NAMES,
    build_model,
    get_classifier,
    is_known_model,
    torchvision_builders,
)

tp = pytest.importorskip("torch_pruning")

EXPECTED_NAMES = (
    "vgg11", "vgg13", "vgg16", "vgg19",
    "resnet20", "resnet56", "resnet110", "resnet164",
    "densenet40",
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # The models are tiny; intra-op threads only add contention on a busy CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_model_names():
    assert MODEL_NAMES == EXPECTED_NAMES
    for name in MODEL_NAMES:
        assert is_known_model(name)
    assert is_known_model("torchvision:resnet18")
    assert is_known_model("torchvision:mobilenet_v2")
    assert not is_known_model("torchvision:not_a_model")
    assert not is_known_model("resnet18")
    assert not is_known_model("")


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_builds_and_forward(name):
    model = build_model(name, 10)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert isinstance(get_classifier(model), nn.Linear)
    assert get_classifier(model).out_features == 10


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "resnet164", "densenet40"])
def test_num_classes_and_in_channels(name):
    model = build_model(name, 100, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
        # adaptive pooling: other input sizes work as well
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 100)


def test_param_counts():
    counts = {name: n_params(build_model(name, 10)) for name in EXPECTED_NAMES}
    for name, c in counts.items():
        print(f"{name}: {c / 1e6:.3f}M params")
    # torch-pruning's CIFAR-10 ResNet-56 (projection shortcuts): 0.86M
    assert abs(counts["resnet56"] - 0.86e6) / 0.86e6 < 0.01
    # network slimming papers: VGG-19 20.04M, PreResNet-164 1.70M, DenseNet-40 1.06M
    assert abs(counts["vgg19"] - 20.04e6) / 20.04e6 < 0.01
    assert abs(counts["resnet164"] - 1.70e6) / 1.70e6 < 0.03
    assert abs(counts["densenet40"] - 1.06e6) / 1.06e6 < 0.03
    assert abs(counts["resnet20"] - 0.27e6) / 0.27e6 < 0.03
    assert abs(counts["resnet110"] - 1.73e6) / 1.73e6 < 0.03
    assert counts["vgg11"] < counts["vgg13"] < counts["vgg16"] < counts["vgg19"]


def test_architecture_details():
    vgg = build_model("vgg19", 10)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 4
    assert vgg.classifier.in_features == 512

    r56 = build_model("resnet56", 10)
    # 1 stem conv + 2 per block * 27 blocks + 2 projection shortcuts
    assert sum(isinstance(m, nn.Conv2d) for m in r56.modules()) == 1 + 54 + 2

    r164 = build_model("resnet164", 10)
    assert sum(isinstance(m, nn.Conv2d) for m in r164.modules()) == 1 + 3 * 54 + 3
    assert r164.bn.num_features == 256 and r164.fc.in_features == 256
    first = r164.layer1[0]
    assert first.bn1.num_features == 16 and first.conv3.out_channels == 64

    d40 = build_model("densenet40", 10)
    assert d40.conv1.out_channels == 24
    assert d40.trans1.conv1.in_channels == 24 + 12 * 12 == d40.trans1.conv1.out_channels
    assert d40.bn.num_features == 312 + 12 * 12 == d40.fc.in_features
    assert sum(isinstance(m, nn.Conv2d) for m in d40.modules()) == 1 + 36 + 2


@pytest.mark.parametrize("name", ["vgg16", "resnet56", "resnet164", "densenet40", "torchvision:resnet18"])
def test_bn_init(name):
    default = build_model(name, 10)
    assert all(torch.all(bn.weight == 1.0) for bn in bn_layers(default))
    model = build_model(name, 10, bn_init=0.5)
    bns = bn_layers(model)
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 0.5)
        assert torch.all(bn.bias == 0.0)


def test_conv_init_is_kaiming():
    model = build_model("vgg19", 10)
    conv = model.feature[-3]
    assert isinstance(conv, nn.Conv2d)
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    expected = (2.0 / fan_out) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.05


def test_torchvision_models():
    model = build_model("torchvision:resnet18", 10).eval()
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mb = build_model("torchvision:mobilenet_v2", 7, in_channels=1, bn_init=0.5).eval()
    with torch.no_grad():
        assert mb(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert "resnet18" in torchvision_builders()


def test_unknown_names():
    with pytest.raises(ValueError) as exc:
        build_model("resnet18", 10)
    msg = str(exc.value)
    assert "unknown model 'resnet18'" in msg
    assert "vgg11" in msg and "densenet40" in msg and "torchvision:<builder>" in msg
    assert "\n" not in msg
    with pytest.raises(ValueError, match="unknown torchvision builder 'nope'"):
        build_model("torchvision:nope", 10)
    with pytest.raises(ValueError):
        build_model("resnet56", 0)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_fx_trace(name):
    model = build_model(name, 10).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("name", ["resnet20", "densenet40"])
def test_onnx_export(name):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.onnx.export(
        model, (x,), buf, dynamo=False, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert abs(out - ref).max() < 1e-3 * max(1.0, abs(ref).max())


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_torch_pruning_half(name):
    model = build_model(name, 10, bn_init=0.5)
    example = torch.randn(1, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    assert len(list(dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))) > 0

    before = n_params(model)
    fc = get_classifier(model)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[fc],
    )
    pruner.step()
    after = n_params(model)
    # halving (almost) every width leaves roughly a quarter of the weights
    assert 0.2 * before < after < 0.3 * before
    assert fc.out_features == 10
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def _zero_then_prune(model: nn.Module, pick, idxs: list[int]) -> None:
    """Zero the filters of a pruning group, then prune it: outputs must not change.

    With fresh BN (beta = 0) in training mode a zeroed channel stays zero through
    every consumer, so removing it must leave the logits unchanged.  This checks
    that torch-pruning maps indices correctly through concatenations and
    residual additions.
    """
    x = torch.randn(4, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    model.train()  # tracing switches the model to eval()
    group = dg.get_pruning_group(pick(model), tp.prune_conv_out_channels, idxs=idxs)
    with torch.no_grad():
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Conv2d) and dg.is_out_channel_pruning_fn(item.dep.handler):
                module.weight[item.idxs] = 0.0
        ref = model(x)
        group.prune()
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,pick,idxs",
    [
        ("densenet40", lambda m: m.conv1, [1, 7, 20]),  # feeds every concat of dense1
        ("densenet40", lambda m: m.dense2[3].conv1, [0, 5, 11]),  # growth channels mid-block
        ("densenet40", lambda m: m.trans1.conv1, [3, 100, 150]),
        ("resnet164", lambda m: m.layer2[5].conv3, [0, 17, 100]),  # residual stream of a stage
        ("resnet164", lambda m: m.layer3[0].conv2, [2, 30]),  # inside a bottleneck
        ("resnet56", lambda m: m.layer3[2].conv2, [0, 9, 40]),
    ],
    ids=["dn40-stem", "dn40-dense", "dn40-trans", "r164-stream", "r164-inner", "r56-stream"],
)
def test_pruning_preserves_function(name, pick, idxs):
    _zero_then_prune(build_model(name, 10), pick, idxs)
