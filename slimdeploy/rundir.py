"""The run directory: the name of every file a run leaves, and the writes that make them.

Under torchrun every process holds a RunDir, but only rank 0 writes: on the other ranks the ``write``
and ``save`` methods do nothing, so the directory holds one set of files whatever the process count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from slimdeploy.distributed import Processes
from slimdeploy.plan import ChannelPlan
from slimdeploy.recipe import Recipe
from slimdeploy.report import markdown, plot_latency, plot_scores, plot_widths
from slimdeploy.results import LatencyRow, LayerWidth, RunReport
from slimdeploy.train import save_atomic

MODELS = ("dense", "pruned")


@dataclass(frozen=True)
class RunDir:
    root: Path
    procs: Processes = field(default_factory=Processes)

    @property
    def owner(self) -> bool:
        """Whether this process writes the directory (rank 0)."""
        return self.procs.main

    # --- file names ---------------------------------------------------------------------------------
    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def sparse_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def finetune_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "finetune_last.pt"

    def weights(self, model: str) -> Path:
        """``dense.pt`` or ``pruned.pt``: a state_dict."""
        return self.root / f"{_checked(model)}.pt"

    @property
    def plan(self) -> Path:
        return self.root / "pruned_plan.json"

    @property
    def first_plan(self) -> Path:
        """prune.plan_first: the plan made before sparse training, which a resumed run trains toward."""
        return self.root / "first_plan.json"

    def onnx(self, model: str) -> Path:
        return self.root / f"{_checked(model)}.onnx"

    def onnx_files(self) -> list[Path]:
        """The dense and pruned ONNX files, in that order."""
        return [self.onnx(model) for model in MODELS]

    def int8_onnx(self, model: str) -> Path:
        return self.root / f"{_checked(model)}.int8.onnx"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def scores_png(self) -> Path:
        return self.root / "scores.png"

    @property
    def widths_png(self) -> Path:
        return self.root / "widths.png"

    @property
    def latency_png(self) -> Path:
        return self.root / "latency.png"

    # --- writes (rank 0 only) -----------------------------------------------------------------------
    def write_recipe(self, recipe: Recipe) -> None:
        """Create the directory and record the resolved recipe in it."""
        if self.owner:
            self.root.mkdir(parents=True, exist_ok=True)
            self.recipe.write_text(recipe.to_yaml())

    def save_weights(self, model_name: str, model: nn.Module) -> None:
        if self.owner:
            save_atomic(model.state_dict(), self.weights(model_name))

    def write_plan(self, plan: ChannelPlan, path: Path | None = None) -> None:
        if self.owner:
            plan.to_json(path or self.plan)

    def write_pruning_plots(self, scores: np.ndarray, score_label: str, layers: list[LayerWidth]) -> None:
        """The BN scores' histogram and the kept width of every layer."""
        if self.owner:
            plot_scores(scores, self.scores_png, score_label)
            plot_widths(layers, self.widths_png)

    def write_latency_plot(self, latency: list[LatencyRow]) -> None:
        if self.owner and latency:
            plot_latency(latency, self.latency_png)

    def write_report(self, report: RunReport) -> None:
        """report.json, and report.md showing the plots beside it."""
        if not self.owner:
            return
        self.report_json.write_text(json.dumps(report.to_json(), indent=1))
        plots = [self.scores_png, self.widths_png] + ([self.latency_png] if report.latency else [])
        self.report_md.write_text(markdown(report, [path.name for path in plots]))


def _checked(model: str) -> str:
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    return model
