"""Pieces several test files share: models that look trained, the CLI in a subprocess, small recipes.

Importable as ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` when it loads
``tests/conftest.py`` (a test directory without ``__init__.py``, the default ``prepend`` import mode).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from slimdeploy.bn import affine_bns
from slimdeploy.models import build_model

ROOT = Path(__file__).resolve().parents[1]
COMPRESS = ROOT / "tools" / "compress.py"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

# --set overrides that shrink the quickstart recipe to a run of seconds: small synthetic data, two
# epochs, a short benchmark.
FAST = [
    "data.train_size=256", "data.test_size=128", "data.image_size=16", "data.batch_size=32",
    "train.epochs=2", "finetune.epochs=1", "bench.iters=3", "bench.warmup=1",
    "bench.settings=[{batch: 1, threads: 1}, {batch: 4, threads: 0}]",
]


def trained_like(model: str | nn.Module, seed: int = 0, gamma_power: float = 3, classes: int = 10) -> nn.Module:
    """``model`` in eval mode with BatchNorms as after sparse training (a registry name is built first,
    its weights drawn after ``torch.manual_seed(seed)``).

    γ = U(0, 1)**gamma_power: the default 3 spreads γ over magnitudes; 1 keeps the activations of deep
    models from fading. Shifts β are small but nonzero, so removed channels still send constants onward,
    and the running statistics are away from 0 and 1, so folding them changes the weights.
    """
    if isinstance(model, str):
        torch.manual_seed(seed)
        model = build_model(model, classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in affine_bns(model).values():
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) ** gamma_power)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.1)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def prune_from_zeros(model: nn.Module, example_inputs: torch.Tensor, **kwargs):
    """``prune_with_record`` of ``model`` after setting to 0 the γ of every channel its plan removes (in
    place), as proximal NS leaves them: the second plan removes exactly those zeros, and compensation
    must then reproduce ``model``. ``kwargs`` choose the first plan."""
    from slimdeploy.api import prune_with_record
    from slimdeploy.prune import zero_bn_channels

    first = prune_with_record(model, example_inputs, compensate="none", **kwargs)
    zero_bn_channels(model, first.zeroed_bn_channels)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("how", "amount")}
    outcome = prune_with_record(model, example_inputs, how="zeros", **kwargs)
    assert [g.remove for g in outcome.plan.groups] == [g.remove for g in first.plan.groups]
    return outcome


def cli_command(recipe, *sets: str, out=None, args=()) -> list[str]:
    """``compress.py RECIPE [--out OUT] --quiet ARGS --set S ...`` with this interpreter."""
    cmd = [sys.executable, str(COMPRESS), str(recipe), "--quiet", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    for override in sets:
        cmd += ["--set", override]
    return cmd


def run_cli(recipe, *sets: str, out=None, args=(), timeout: float = 900, **run_kwargs) -> subprocess.CompletedProcess:
    """Run the CLI (see :func:`cli_command`) to its end, capturing its output as text; ``run_kwargs`` go
    to :func:`subprocess.run` (``env``, ``cwd``, ``check``)."""
    return subprocess.run(cli_command(recipe, *sets, out=out, args=args), capture_output=True, text=True,
                          timeout=timeout, **run_kwargs)


def tiny_recipe(**sections: dict) -> dict:
    """A recipe for an in-process pipeline run of seconds: ResNet-20 on 16 synthetic 16 px images, one
    epoch, no fine-tuning, one timed iteration. ``sections`` update keys section by section, e.g.
    ``tiny_recipe(model={"name": "torchvision:resnet18"}, data={"image_size": 32})``."""
    recipe = {
        "device": "cpu",
        "model": {"name": "resnet20"},
        "data": {"name": "synthetic", "image_size": 16, "train_size": 16, "test_size": 16,
                 "batch_size": 16, "eval_batch_size": 16, "augment": False},
        "train": {"epochs": 1, "lr": 0.01, "schedule": "constant"},
        "sparsity": {"method": "subgradient", "penalty": "l1", "lam": 1e-4},
        "prune": {"how": "percent", "percent": 0.3, "calibration_images": 8},
        "finetune": {"epochs": 0},
        "export": {"check_batch": 4},
        "bench": {"iters": 1, "warmup": 0, "torch": False, "settings": [{"batch": 1, "threads": 1}]},
    }
    for section, keys in sections.items():
        recipe[section] = {**recipe.get(section, {}), **keys}
    return recipe
