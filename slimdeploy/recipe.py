"""Recipe schema (pydantic v2), YAML loading and ``--set`` overrides.

A recipe is a YAML file with the sections model, data, train, sparsity, prune, finetune, export and
bench. Every field has a default, so a recipe only states what differs. Bad input raises
:class:`RecipeError`, whose message is one line naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimdeploy import penalties


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Section):
    name: str = "resnet56"
    bn_init: float | None = Field(0.5, description="initial BN γ (the papers use 0.5); null keeps 1.0")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from slimdeploy.models import is_known_model

        if not is_known_model(name):
            from slimdeploy.models import MODEL_NAMES

            raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}, torchvision:<builder>")
        return name


class DataCfg(_Section):
    name: Literal["cifar10", "cifar100", "synthetic"] = "cifar10"
    root: str | None = Field(None, description="folder holding cifar-10-batches-py/ or cifar-100-python/")
    image_size: int = Field(32, ge=8, le=512, description="synthetic only")
    train_size: int = Field(4096, ge=16, description="synthetic only")
    test_size: int = Field(1024, ge=16, description="synthetic only")
    num_classes: int = Field(10, ge=2, le=1000, description="synthetic only")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    augment: bool = True
    channels_last: bool = False


class OptimCfg(_Section):
    """Shared by sparse training and fine-tuning."""

    epochs: int = Field(160, ge=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["multistep", "cosine", "onecycle", "constant"] = "multistep"
    milestones: list[float] = Field([0.5, 0.75], description="fractions of the epochs (multistep)")
    gamma: float = Field(0.1, gt=0, le=1, description="lr factor at each milestone (multistep)")
    amp: bool = Field(False, description="float16 mixed precision with loss scaling (CUDA only)")
    checkpoint_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: at epoch ends only)")

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, ms: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in ms) or ms != sorted(ms):
            raise ValueError(f"milestones must be increasing fractions in (0, 1), got {ms}")
        return ms


class TrainCfg(OptimCfg):
    pass


class FinetuneCfg(OptimCfg):
    epochs: int = Field(0, ge=0)
    lr: float = Field(0.01, gt=0)


class SparsityCfg(_Section):
    method: Literal["none", "subgradient", "proximal", "prox_sgd"] = "subgradient"
    penalty: Literal["l1", "lp", "tl1", "mcp", "scad"] = "l1"
    lam: float = Field(1e-5, ge=0, description="penalty strength λ")
    p: float = Field(0.5, gt=0, lt=1, description="Lp exponent")
    a: float | None = Field(None, description="TL1 a > 0, MCP a > 1, SCAD a > 2; null: the penalty's default")
    beta: float = Field(100.0, gt=0, description="proximal NS coupling β")
    include: list[str] = Field([], description="fnmatch patterns of BN module names to regularise (empty: all)")
    exclude: list[str] = Field([], description="fnmatch patterns of BN module names to leave alone")

    @model_validator(mode="after")
    def _penalty_parameters(self) -> "SparsityCfg":
        try:
            self.make_penalty()
        except NotImplementedError as err:
            raise ValueError(str(err)) from None
        return self

    def make_penalty(self) -> penalties.Penalty:
        params: dict[str, float] = {"p": self.p}
        if self.a is not None:
            params["a"] = self.a
        return penalties.get(self.penalty, self.lam, **params)


class PruneCfg(_Section):
    how: Literal["percent", "threshold", "zeros", "none"] = "percent"
    percent: float = Field(0.5, ge=0, lt=1, description="share of prunable channels removed (global threshold)")
    threshold: float = Field(0.01, ge=0, description="channels whose score is below this go (how: threshold)")
    min_channels: int = Field(1, ge=1, description="channels kept at least per group")
    round_to: int | Literal["auto"] | None = Field(None, description="kept widths multiple of N; auto: SIMD block")
    score_reduce: Literal["max", "mean", "sum"] = "max"
    compensate: Literal["exact", "bias", "none"] = Field(
        "exact",
        description="what removed channels fed forward (their BN shift): exact (bias, plus a per-position map "
        "where zero padding makes it vary; fixes the input size), bias (interior value only), none",
    )
    calibration_images: int = Field(64, ge=1, description="training images for compensation")

    @field_validator("round_to")
    @classmethod
    def _positive(cls, n: int | str | None) -> int | str | None:
        if isinstance(n, int) and n < 1:
            raise ValueError(f"round_to must be a positive integer, 'auto' or null, got {n}")
        return n


class ExportCfg(_Section):
    opset: int = Field(17, ge=17, le=23)
    tolerance: float = Field(1e-4, gt=0, description="max |ORT - PyTorch| allowed, relative to max |logit|")
    check_batch: int = Field(16, ge=1)


class BenchSetting(_Section):
    batch: int = Field(1, ge=1)
    threads: int = Field(1, ge=0, description="0: all cores")


class BenchCfg(_Section):
    iters: int = Field(100, ge=1)
    warmup: int = Field(10, ge=0)
    settings: list[BenchSetting] = Field(
        default_factory=lambda: [BenchSetting(batch=1, threads=1), BenchSetting(batch=64, threads=0)]
    )
    torch: bool = Field(True, description="also time PyTorch eager")


class Recipe(_Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    train: TrainCfg = TrainCfg()
    sparsity: SparsityCfg = SparsityCfg()
    prune: PruneCfg = PruneCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    export: ExportCfg = ExportCfg()
    bench: BenchCfg = BenchCfg()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required"
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    got = f" (got {first['input']!r})" if first["type"] not in ("extra_forbidden", "missing") else ""
    return f"{source}: {key}: {msg}{got}{extra}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise RecipeError(f"--set {dotted}: empty key part")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise RecipeError(f"--set {key}: value {raw!r} is not valid YAML") from None
    return key.strip(), value


def build_recipe(tree: dict | None, overrides: list[str] = (), source: str = "recipe") -> Recipe:
    tree = dict(tree or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, override and validate a recipe file; every failure is a one-line RecipeError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe ({err.strerror})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text (UTF-8) file") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise RecipeError(f"{path}: not valid YAML{line}") from None
    if tree is not None and not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (model, data, train, ...)")
    return build_recipe(tree, overrides, source=str(path))
