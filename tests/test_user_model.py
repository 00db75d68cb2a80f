"""A user's own model file, its trained weights and an ImageFolder, through the CLI and the library;
pretrained torchvision weights from the hub cache; bad model input as one line with exit code 2."""

import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import slimdeploy as sd
from slimdeploy.errors import ModelError
from slimdeploy.models import build_model

from helpers import run_cli, trained_like

USER_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc = nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1), nn.Sigmoid())
        def forward(self, x):
            return x * self.fc(x.mean((2, 3), keepdim=True))

    class InvertedResidual(nn.Module):
        def __init__(self, c, expand):
            super().__init__()
            h = c * expand
            self.body = nn.Sequential(
                nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(), SE(h),
                nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        def forward(self, x):
            return x + self.body(x)

    class MobileStyle(nn.Module):
        def __init__(self, num_classes=3, width=16):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU6())
            self.blocks = nn.Sequential(InvertedResidual(width, 4), InvertedResidual(width, 4))
            self.head = nn.Linear(width, num_classes)
        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    def mobile_style(num_classes=3, width=16):
        return MobileStyle(num_classes, width)

    def raises(**kwargs):
        raise RuntimeError("no such width")

    def not_a_model(**kwargs):
        return 42

    def no_bn(num_classes=3):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
""")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A model file and an ImageFolder outside the project, and the model's trained weights."""
    root = tmp_path_factory.mktemp("user")
    (root / "usermodels.py").write_text(USER_MODEL)
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, n in (("train", 24), ("val", 8)):
        for name, rgb in colours.items():
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(rgb, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    sys.path.insert(0, str(root))
    import usermodels

    torch.manual_seed(0)
    model = trained_like(usermodels.mobile_style(num_classes=3), gamma_power=2)
    torch.save({"epoch": 7, "state_dict": model.state_dict()}, root / "trained.pt")
    yield root, usermodels
    sys.path.remove(str(root))


def _recipe(root: Path, **model) -> Path:
    path = root / "recipe.yaml"
    model_yaml = ", ".join(f"{k}: {v}" for k, v in {"name": f"{root / 'usermodels.py'}:mobile_style",
                                                      "kwargs": "{num_classes: 3}",
                                                      "weights": str(root / "trained.pt"), **model}.items())
    path.write_text(textwrap.dedent(f"""
        model: {{{model_yaml}}}
        data: {{name: imagefolder, root: {root / 'images'}, image_size: 32, batch_size: 8, augment: imagenet}}
        train: {{epochs: 1, lr: 0.01}}
        sparsity: {{method: subgradient, penalty: l1, lam: 1.0e-4}}
        prune: {{percent: 0.4, round_to: 4}}
        finetune: {{epochs: 1, lr: 0.005}}
        bench: {{iters: 2, warmup: 1, torch: false, settings: [{{batch: 1, threads: 1}}]}}
    """))
    return path


@pytest.mark.slow
def test_user_model_weights_and_imagefolder_through_the_cli(project):
    root, usermodels = project
    out = root / "run"
    res = run_cli(_recipe(root), out=out, args=["--export", "onnx"])
    assert res.returncode == 0, res.stderr[-3000:]
    plan = (out / "pruned_plan.json").read_text()
    assert "usermodels.py:mobile_style" in plan and '"num_classes": 3' in plan
    # the run started from the trained γ (spread, not the 0.5 of bn_init), which one short epoch at
    # lr 0.01 moved only a little
    trained = torch.load(root / "trained.pt", weights_only=True)["state_dict"]
    dense = torch.load(out / "dense.pt", weights_only=True)
    assert torch.allclose(dense["stem.1.weight"], trained["stem.1.weight"], atol=0.05)
    assert trained["stem.1.weight"].std() > 0.1
    # a function factory is rebuilt only when the caller names it
    with pytest.raises(ModelError, match="pass build="):
        sd.load_pruned(out)
    pruned = sd.load_pruned(out, build=f"{root / 'usermodels.py'}:mobile_style").eval()
    x = torch.randn(2, 3, 32, 32)
    session = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, pruned(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_user_model_weights_through_the_library(project, tmp_path):
    root, usermodels = project
    model = build_model(f"{root / 'usermodels.py'}:mobile_style", 3, kwargs={"num_classes": 3},
                        weights=str(root / "trained.pt")).eval()
    x = torch.randn(4, 3, 32, 32)
    pruned, plan = sd.prune(model, x, amount=0.4, round_to=4, model_name="usermodels:MobileStyle")
    sd.save_pruned(tmp_path / "p.pt", pruned, plan)
    torch.testing.assert_close(sd.load_pruned(tmp_path / "p.pt").eval()(x), pruned(x))
    check = sd.export_onnx(pruned, tmp_path / "p.onnx", x)
    assert check.max_abs_diff <= 1e-4 * check.max_abs_logit


def test_pretrained_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError, match=r"put https://\S+resnet18-f37072fd\.pth at \S+/hub/checkpoints/"):
        build_model("torchvision:resnet18", 10, weights="IMAGENET1K_V1")
    torch.manual_seed(0)
    imagenet = build_model("torchvision:resnet18", 1000)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_model("torchvision:resnet18", 10, weights="DEFAULT", bn_init=0.5)
    torch.testing.assert_close(model.conv1.weight, imagenet.conv1.weight)
    torch.testing.assert_close(model.bn1.weight, imagenet.bn1.weight)  # bn_init is not applied over weights
    assert model.fc.out_features == 10  # a new head for the user's classes
    with pytest.raises(ModelError, match="'IMAGENET9K' is not a weights name of resnet18; allowed: DEFAULT"):
        build_model("torchvision:resnet18", 10, weights="IMAGENET9K")


@pytest.mark.parametrize(
    "model, message",
    [
        ({"name": "no_such_package.models:net"}, "model.name: cannot import 'no_such_package.models'"),
        ({"name": "{root}/usermodels.py:missing"}, "has no attribute 'missing'"),
        ({"name": "{root}/nowhere.py:net"}, "model.name: file not found"),
        ({"name": "{root}/usermodels.py:raises"}, "raised RuntimeError: no such width"),
        ({"name": "{root}/usermodels.py:not_a_model"}, "returned a int, not a torch nn.Module"),
        ({"name": "{root}/usermodels.py:no_bn", "weights": "null"}, "has no BatchNorm layer"),
        ({"kwargs": "{num_classes: 5}"}, "model.weights: weights do not fit MobileStyle: "),
        ({"weights": "{root}/missing.pt"}, "model.weights: file not found"),
        ({"weights": "{root}/recipe.yaml"}, "is not a weights_only-loadable torch file"),
    ],
)
@pytest.mark.slow
def test_bad_model_input_is_one_line_with_exit_2(project, model, message):
    root, _ = project
    model = {k: v.replace("{root}", str(root)) for k, v in model.items()}
    res = run_cli(_recipe(root, **model), out=root / "bad")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert message in lines[0], lines[0]
