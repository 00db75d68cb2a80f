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

from slimdeploy import penalties, plan, sparsity
from slimdeploy.errors import InputError
from slimdeploy.registry import Registry


class RecipeError(InputError):
    """A recipe or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _registered(registry: Registry, name: str) -> str:
    """``name`` if ``registry`` holds it when the recipe is validated (so a choice registered later is
    accepted too); otherwise the registry's ValueError listing the allowed names."""
    registry.get(name)
    return name


class ModelCfg(_Section):
    name: str = Field("resnet56", description="a built-in name, torchvision:<builder>, or a factory's import "
                      "path package.module:factory or path/to/file.py:factory")
    kwargs: dict[str, Any] = Field({}, description="keyword arguments of the builder or factory")
    weights: str | None = Field(None, description="a state_dict file (or a checkpoint holding one under "
                                "state_dict or model), or for torchvision builders DEFAULT or a weights name "
                                "such as IMAGENET1K_V1, read from torch hub's cache")
    bn_init: float | None = Field(0.5, description="initial BN γ (the papers use 0.5); null keeps 1.0; "
                                  "not applied over weights")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from slimdeploy.models.registry import check_model_name

        check_model_name(name)
        return name

    @model_validator(mode="after")
    def _weights_or_bn_init(self) -> "ModelCfg":
        if self.weights and "bn_init" in self.model_fields_set and self.bn_init is not None:
            raise ValueError("bn_init initialises γ of an untrained model; with weights it is not applied: "
                             "remove bn_init or set it to null")
        return self


IN_MEMORY_DATA = ("cifar10", "cifar100", "synthetic")


class DataCfg(_Section):
    """CIFAR and synthetic images are held in memory; imagefolder and factory images are decoded per sample."""

    name: str = Field(
        "cifar10",
        description="cifar10, cifar100, synthetic, imagefolder (data.root holds train/ and val/, one folder of "
        "images per class), or a factory package.module:function or path/to/file.py:function returning "
        "(train, val, num_classes): torch Datasets of (image, label), the image a PIL image or a uint8 "
        "[3, H, W] tensor. Float tensors are refused: images stay uint8 until data.mean/std normalise them "
        "on the device, so a factory must not normalise",
    )
    root: str | None = Field(None, description="CIFAR: the folder holding cifar-10-batches-py/ or "
                             "cifar-100-python/; imagefolder: the folder holding train/ and val/")
    image_size: int | None = Field(None, ge=8, le=512, description="input size S, images come out S×S; null: "
                                   "32 for CIFAR (its only size) and synthetic, 224 for imagefolder and factories")
    train_size: int = Field(4096, ge=16, description="synthetic only")
    test_size: int = Field(1024, ge=16, description="synthetic only")
    num_classes: int = Field(10, ge=2, le=1000, description="synthetic only")
    holdout: int = Field(0, ge=0, description="training images (a fixed draw) held out as the evaluation split in "
                         "place of the test split, to choose λ and other settings without seeing the test set; 0: none")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    augment: bool | Literal["cifar", "imagenet", "none"] = Field(
        True,
        description="training augmentation: cifar (random crop with S/8 zero padding, horizontal flip), imagenet "
        "(random resized crop, horizontal flip; evaluation resizes to S/0.875 and centre-crops), none; true: "
        "cifar for CIFAR and synthetic, imagenet for imagefolder and factories; false: none",
    )
    mean: tuple[float, float, float] | None = Field(None, description="per-channel mean of pixels in [0, 1]; "
                                                    "null: the CIFAR set's, 0.5 synthetic, ImageNet's otherwise")
    std: tuple[float, float, float] | None = Field(None, description="per-channel standard deviation, as mean")
    workers: int = Field(0, ge=0, description="DataLoader processes decoding imagefolder and factory images "
                         "(0: the training process); batches are pinned in memory where CUDA is available")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="NHWC memory format for training; auto: on, except on CUDA in fp32 (where it rarely pays)")

    @field_validator("channels_last", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value):
        if value not in (True, False, "auto"):  # not pydantic's lax bools ("yes", "off", ...)
            raise ValueError("channels_last must be true, false or auto")
        return value

    @field_validator("name")
    @classmethod
    def _known_data(cls, name: str) -> str:
        from slimdeploy.data import DATASETS
        from slimdeploy.imports import is_import_path

        if name not in DATASETS and not is_import_path(name):
            raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS.names())}, "
                             f"package.module:factory, path/to/file.py:factory")
        return name

    @field_validator("image_size")
    @classmethod
    def _cifar_is_32(cls, size: int | None, info) -> int | None:
        if size not in (None, 32) and info.data.get("name") in ("cifar10", "cifar100"):
            raise ValueError("CIFAR images are 32×32: leave image_size null or set 32")
        return size

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_fits_data(cls, augment, info):
        if augment not in (True, False, "cifar", "imagenet", "none"):
            raise ValueError("augment must be true, false, cifar, imagenet or none")
        if augment == "imagenet" and info.data.get("name") in IN_MEMORY_DATA:
            raise ValueError("imagenet augmentation is for imagefolder and factory data; CIFAR and synthetic "
                             "take true, cifar or none")
        return augment

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _three_channels(cls, values, info):
        if values is not None and (not isinstance(values, (list, tuple)) or len(values) != 3):
            raise ValueError(f"{info.field_name} must be null or 3 numbers (red, green, blue)")
        return values

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std):
        if std is not None and min(std) <= 0:
            raise ValueError("std must be positive in every channel")
        return std

    @property
    def in_memory(self) -> bool:
        return self.name in IN_MEMORY_DATA

    @property
    def input_size(self) -> int:
        """S: images come out S×S."""
        return self.image_size or (32 if self.in_memory else 224)

    @property
    def augmentation(self) -> Literal["cifar", "imagenet", "none"]:
        if self.augment is True:
            return "cifar" if self.in_memory else "imagenet"
        return "none" if self.augment is False else self.augment


class OptimCfg(_Section):
    """Shared by sparse training and fine-tuning."""

    epochs: int = Field(160, ge=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    nesterov: bool = False
    schedule: str = Field("multistep", description="a name in slimdeploy.train.SCHEDULES (multistep, cosine, ...)")
    milestones: list[float] = Field([0.5, 0.75], description="fractions of the epochs (multistep)")
    gamma: float = Field(0.1, gt=0, le=1, description="lr factor at each milestone (multistep)")
    amp: bool = Field(False, description="superseded by precision; true: fp16 on CUDA, as precision auto does")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="training steps' precision (parameters, optimizer and sparsifier state stay fp32): bf16 or "
        "fp16 autocast, fp16 with loss scaling and on CUDA only (fp32 elsewhere); auto: bf16 on CPUs with "
        "AVX-512 BF16 or AMX, fp16 on CUDA, fp32 otherwise",
    )
    checkpoint_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: at epoch ends only)")

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        from slimdeploy.train import SCHEDULES

        return _registered(SCHEDULES, name)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, ms: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in ms) or ms != sorted(ms):
            raise ValueError(f"milestones must be increasing fractions in (0, 1), got {ms}")
        return ms

    @field_validator("precision")
    @classmethod
    def _amp_means_fp16(cls, precision: str, info) -> str:
        if info.data.get("amp") and precision not in ("auto", "fp16"):
            raise ValueError("contradicts amp: true, which asks for fp16; remove amp (precision supersedes it)")
        return precision


class TrainCfg(OptimCfg):
    bn_weight_decay: float | None = Field(None, ge=0, allow_inf_nan=False, description="weight decay of BN γ and β; "
                                          "the penalty already acts on γ, so 0 leaves them to it; null: weight_decay")
    bn_lr_scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="BN γ and β learn at lr × this; the "
                               "sparsifier's step on γ uses that rate too")


class FinetuneCfg(OptimCfg):
    epochs: int = Field(0, ge=0)
    lr: float = Field(0.01, gt=0)


class SparsityCfg(_Section):
    method: str = Field("subgradient", description="a name in slimdeploy.sparsity.SPARSIFIERS (none, proximal, ...)")
    penalty: str = Field("l1", description="a name in slimdeploy.penalties.PENALTIES (l1, lp, ...)")
    lam: float = Field(1e-5, ge=0, description="penalty strength λ")
    p: float = Field(0.5, gt=0, lt=1, description="Lp exponent")
    a: float | None = Field(None, description="TL1 a > 0, MCP a > 1, SCAD a > 2; null: the penalty's default")
    beta: float = Field(100.0, gt=0, allow_inf_nan=False, description="proximal NS coupling β")
    include: list[str] = Field([], description="fnmatch patterns of BN module names to regularise (empty: all)")
    exclude: list[str] = Field([], description="fnmatch patterns of BN module names to leave alone")

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        return _registered(sparsity.SPARSIFIERS, name)

    @field_validator("penalty")
    @classmethod
    def _known_penalty(cls, name: str) -> str:
        return _registered(penalties.PENALTIES, name)

    @field_validator("lam", "p", "a")
    @classmethod
    def _accepted_by_penalty(cls, value: float | None, info) -> float | None:
        """The penalty checks each parameter on its own, so a range error names that parameter's key."""
        penalty = info.data.get("penalty")  # absent when the penalty name itself was refused
        if value is not None and penalty is not None:
            penalties.get(penalty, **{"lam": 0.0, info.field_name: value})
        return value

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
    how: str = Field(
        "percent", description="a name in slimdeploy.plan.PLAN_MODES; latency: keep the most channel score "
        "within a latency budget measured in onnxruntime at the first bench.settings entry (target_speedup or "
        "target_ms)")
    target_speedup: float | None = Field(None, gt=1, description="how: latency: measured speedup over the dense "
                                         "model to reach (see latency_fit)")
    target_ms: float | None = Field(None, gt=0, validate_default=True,
                                    description="how: latency: pruned latency to reach (ms per batch; see latency_fit)")
    latency_fit: Literal["within", "at_most"] = Field(
        "within", description="how: latency: the measured latency lands within ±5 % of the target, or at_most "
        "the target and no more than 5 % below it (a budget the pruned model must not exceed); a warning says "
        "when the correction rounds end outside")
    percent: float = Field(0.5, ge=0, lt=1, description="share of prunable channels removed (global threshold)")
    threshold: float = Field(0.01, ge=0, description="channels whose score is below this go (how: threshold)")
    min_channels: int = Field(1, ge=1, description="channels kept at least per group")
    round_to: int | Literal["auto"] | None = Field(None, description="kept widths multiple of N; auto: SIMD block "
                                                     "(how: latency halves it while the target is out of reach)")
    score_reduce: Literal["max", "mean", "sum"] = "max"
    importance: Literal["bn", "group_norm", "taylor"] = Field(
        "bn", description="what ranks channels: bn, the sparsified BN scores (|γ|, or ξ for proximal NS); "
        "group_norm, the squared norm of every weight tied to the channel across its coupled group over the "
        "group's mean (DepGraph; a threshold is then relative to that mean); taylor, the loss change that "
        "removing the channel predicts to first order (Taylor-FO-BN, on taylor_images training images); "
        "channels scoring exactly 0 still first")
    taylor_images: int = Field(10_240, ge=1, description="importance: taylor: training images (not augmented, in "
                               "data.batch_size batches) the loss gradients are averaged over; with fewer the plan "
                               "moves with the sample")
    compensate: Literal["exact", "bias", "none"] = Field(
        "exact",
        description="what removed channels fed forward (their BN shift): exact (bias, plus a per-position map "
        "where zero padding makes it vary, for channels scoring 0; fixes the input size), bias (interior "
        "value only), none",
    )
    calibration_images: int = Field(64, ge=1, description="training images for compensation")
    plan_first: bool = Field(
        False, description="make the plan on the starting model, before sparse training, and put the penalty on "
        "the channels it removes alone; pruning then removes exactly those. With sparsity.method: proximal their "
        "ξ reach 0 and their γ and shift are then held at 0, so pruning loses nothing once every planned channel "
        "is at 0 (λ large enough: the report counts them); for a model already trained (model.weights)")
    bn_recalibration_images: int = Field(
        0, ge=0, description="after pruning, BN statistics re-estimated on this many training images, weights "
        "untouched (adaptive BN: pruned past the zeros, every later BN sees other statistics); 0: off",
    )

    def prune_kwargs(self) -> dict:
        """Keyword arguments of :func:`slimdeploy.prune` (``amount`` is the percent or the threshold)."""
        kwargs = dict(how=self.how, amount=self.threshold if self.how == "threshold" else self.percent,
                      round_to=self.round_to, min_channels=self.min_channels, compensate=self.compensate,
                      score_reduce=self.score_reduce, importance=self.importance)
        if self.how == "latency":
            kwargs.update(target_speedup=self.target_speedup, target_ms=self.target_ms, latency_fit=self.latency_fit)
        return kwargs

    @field_validator("how")
    @classmethod
    def _known_mode(cls, name: str) -> str:
        return _registered(plan.PLAN_MODES, name)

    @field_validator("target_speedup")
    @classmethod
    def _speedup_for_latency(cls, speedup: float | None, info) -> float | None:
        if speedup is not None and info.data.get("how", "latency") != "latency":
            raise ValueError("is only used with how: latency")
        return speedup

    @field_validator("target_ms")
    @classmethod
    def _one_latency_target(cls, ms: float | None, info) -> float | None:
        if "target_speedup" not in info.data:  # target_speedup itself was refused
            return ms
        speedup, how = info.data["target_speedup"], info.data.get("how")
        if ms is not None and speedup is not None:
            raise ValueError("set target_speedup or target_ms, not both")
        if ms is not None and how != "latency":
            raise ValueError("is only used with how: latency")
        if how == "latency" and ms is None and speedup is None:
            raise ValueError("how: latency needs target_speedup or target_ms")
        return ms

    @field_validator("latency_fit")
    @classmethod
    def _fit_for_latency(cls, fit: str, info) -> str:  # runs only when the key is given
        if info.data.get("how", "latency") != "latency":
            raise ValueError("is only used with how: latency")
        return fit

    @field_validator("importance")
    @classmethod
    def _group_norm_reduces_itself(cls, importance: str, info) -> str:
        if importance != "bn" and info.data.get("score_reduce", "max") != "max":
            raise ValueError(f"{importance} already covers every layer of a group: leave score_reduce at max")
        return importance

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
    int8_target: Literal["auto", "x86", "arm"] = Field(
        "auto", description="CPU the INT8 model is for (--export onnx-int8): x86 (U8 activations, S8 per-channel "
        "weights, 7-bit weights where the exporting CPU lacks VNNI), arm (S8 activations and weights); auto: this "
        "machine's architecture")
    int8_calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="onnxruntime's calibration method for the INT8 activation ranges; percentile and "
        "entropy clip outliers; entropy takes minutes per model (ResNet-20: ~2 min against ~6 s for minmax)")
    int8_calibration_images: int = Field(256, ge=1, description="training images that calibrate INT8")


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
    runtimes: list[str] = Field(
        ["onnxruntime"], description="runtimes that run and time the exported models: onnxruntime, openvino "
        "(both read the ONNX files), executorch (a .pte program exported beside each ONNX file; the executorch "
        "extra); each one but onnxruntime is also checked against PyTorch on the export check batch")

    @field_validator("runtimes")
    @classmethod
    def _known_installed_runtimes(cls, names: list[str]) -> list[str]:
        from slimdeploy.runtimes import check_runtime

        if len(set(names)) != len(names):
            raise ValueError(f"runtimes must not repeat a name, got {names}")
        return [check_runtime(name) for name in names]


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
    loc = first["loc"]
    key = ".".join(str(part) for part in loc) or "(top level)"
    # "a must be in (2, inf) for scad" under the key sparsity.a reads "sparsity.a: must be in ..."
    msg = first["msg"].removeprefix("Value error, ").removeprefix(f"{loc[-1]} " if loc else "")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required"
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    # validators' own messages already end in ", got VALUE" or name it ("unknown penalty 'x'")
    shows_input = (first["type"] not in ("extra_forbidden", "missing") and ", got " not in msg
                   and repr(first["input"]) not in msg)
    got = f" (got {first['input']!r})" if shows_input else ""
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
