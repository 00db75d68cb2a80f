"""What a RunReport looks like to people: report.md, the plots beside it, and several runs compared in
one table and plots (``slimdeploy compare``)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from slimdeploy.errors import InputError  # noqa: E402
from slimdeploy.results import (  # noqa: E402
    Int8Summary, LatencyRow, LayerWidth, PruningSummary, RunReport, SparsitySummary,
)


def plot_scores(scores: np.ndarray, path: Path, label: str) -> None:
    """Histogram of BN scores after sparse training, log-spaced bins (exact zeros counted apart)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    nonzero = scores[scores > 0]
    zeros = int((scores == 0).sum())
    if len(nonzero):
        lo, hi = max(nonzero.min(), 1e-12), nonzero.max()
        bins = np.logspace(np.log10(lo), np.log10(hi * 1.0001), 50) if hi > lo else 10
        ax.hist(nonzero, bins=bins, color="tab:blue")
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("channels")
    ax.set_title(f"{label} after sparse training ({zeros} exact zeros of {len(scores)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_widths(layers: list[LayerWidth], path: Path) -> None:
    """Kept channels per layer: before/after bars."""
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(layers) + 2), 3.5))
    x = np.arange(len(layers))
    ax.bar(x, [layer.before for layer in layers], color="lightgray", label="dense")
    ax.bar(x, [layer.after for layer in layers], color="tab:green", label="pruned")
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("output channels")
    ax.set_xlim(-1, len(layers))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(latency: list[LatencyRow], path: Path) -> None:
    """p50 latency per benchmark setting, dense vs pruned."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(latency))
    ax.bar(x - 0.2, [r.dense.p50 for r in latency], 0.4, label="dense", color="gray")
    ax.bar(x + 0.2, [r.pruned.p50 for r in latency], 0.4, label="pruned", color="tab:green")
    ax.set_xticks(x, [f"{r.backend}\nbatch {r.batch}, {r.threads} thr" for r in latency], fontsize=8)
    ax.set_ylabel("p50 latency (ms per batch)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, spec=",") -> str:
    return "–" if v is None else format(v, spec)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _recalibrated(report: RunReport) -> str:
    images = report.pruning.bn_recalibration_images
    return f", BN statistics re-estimated on {images} training images" if images else ""


def _model_rows(report: RunReport) -> list[str]:
    """The dense-vs-pruned table's rows: accuracy, size, cost, then one row per latency setting."""
    d, p = report.dense, report.pruned
    rows = [
        f"| top-1 accuracy (%) | {_fmt(d.accuracy, '.2f')} | {_fmt(p.accuracy, '.2f')} | |",
        f"| accuracy right after pruning{_recalibrated(report)} (%) | | "
        f"{_fmt(report.pruned_no_finetune_accuracy, '.2f')} | |",
        f"| params | {d.params:,} | {p.params:,} | {_ratio(d.params, p.params)} |",
        f"| MACs ({report.macs_counter}) | {d.macs:,} | {p.macs:,} | {_ratio(d.macs, p.macs)} |",
        f"| MACs (torch.utils.flop_counter) | {d.macs_flop_counter:,} | {p.macs_flop_counter:,} | "
        f"{_ratio(d.macs_flop_counter, p.macs_flop_counter)} |",
    ]
    if d.onnx_bytes:
        rows.append(f"| ONNX file (MB) | {d.onnx_bytes / 1e6:.2f} | {p.onnx_bytes / 1e6:.2f} | "
                    f"{_ratio(d.onnx_bytes, p.onnx_bytes)} |")
    if d.peak_rss_mb:
        rows.append(f"| peak RSS, ORT load + 1 batch (MiB) | {d.peak_rss_mb:.1f} | {p.peak_rss_mb:.1f} | "
                    f"{_ratio(d.peak_rss_mb, p.peak_rss_mb)} |")
    macs_cut = d.macs / p.macs
    for r in report.latency:
        rows.append(f"| {r.backend} p50 / p90 (ms), batch {r.batch}, {r.threads} thread(s) | "
                    f"{r.dense.p50:.3f} / {r.dense.p90:.3f} | {r.pruned.p50:.3f} / {r.pruned.p90:.3f} | "
                    f"{r.speedup:.2f}× (÷ MACs cut: {r.speedup / macs_cut:.2f}) |")
    return rows


def _int8_lines(q: Int8Summary) -> list[str]:
    qd, qp = q.dense, q.pruned
    lines = ["", f"INT8: static QDQ for {q.target}, {q.activation} activations, {q.weights} weights"
                 f"{' (7-bit range)' if q.reduce_range else ''}, {q.calibration} calibration on "
                 f"{q.calibration_images} training images; FP32 timed beside it, interleaved, in each "
                 f"runtime.",
             "", "| INT8 | dense | pruned |", "|---|---:|---:|",
             f"| top-1 accuracy (%), INT8 / FP32 ONNX in onnxruntime | {_fmt(qd.accuracy, '.2f')} / "
             f"{_fmt(qd.fp32_accuracy, '.2f')} | {_fmt(qp.accuracy, '.2f')} / {_fmt(qp.fp32_accuracy, '.2f')} |"]
    lines += [f"| top-1 accuracy (%), INT8 in {name} | {accuracy:.2f} | "
              f"{_fmt(qp.accuracy_by_runtime.get(name), '.2f')} |" for name, accuracy in qd.accuracy_by_runtime.items()]
    lines.append(f"| ONNX file (MB) | {qd.onnx_bytes / 1e6:.2f} | {qp.onnx_bytes / 1e6:.2f} |")
    for r in q.latency:
        fast = r.speedup_vs_fp32
        lines.append(f"| {r.backend} p50 (ms) INT8 / FP32, batch {r.batch}, {r.threads} thread(s) | "
                     f"{r.dense.p50:.3f} / {r.dense_fp32.p50:.3f} ({fast.dense:.2f}×) | "
                     f"{r.pruned.p50:.3f} / {r.pruned_fp32.p50:.3f} ({fast.pruned:.2f}×) |")
    return lines


def _pruning_lines(pr: PruningSummary) -> list[str]:
    lines = ["", f"Channels kept: {pr.channels_kept} of {pr.channels_total} "
                 f"({100 * pr.channels_kept / max(pr.channels_total, 1):.1f} %)."]
    if pr.proximal:
        z = pr.proximal
        lines.append(f"Proximal NS: {z.xi_zeros} of {z.channels} ξ are exactly zero; {z.gamma_nonzero_at_xi_zero} "
                     f"of their γ are not (max |γ| {z.gamma_max_abs_at_xi_zero:.3g}).")
    return lines


def markdown(report: RunReport, figures: list[str]) -> str:
    """report.md: the run at a glance, the figures (file names beside report.md), then every layer's width."""
    s, pr = report.sparsity, report.pruning
    lines = [
        f"# {report.recipe}: {report.model} on {report.dataset}",
        "",
        f"Sparsity: {s.method} / {s.penalty} (λ = {s.lam}); plan: {pr.how}; training {report.train.epochs} epochs "
        f"in {report.train.seconds:.0f} s, fine-tuning {report.finetune.epochs} epochs.",
        "",
        "| | dense | pruned | dense ÷ pruned |",
        "|---|---:|---:|---:|",
        *_model_rows(report),
    ]
    if report.export:
        e = report.export
        lines += ["", f"ONNX check (opset {e.opset}): max |ORT − PyTorch| = {e.max_abs_diff:.3g} "
                      f"with max |logit| = {e.max_abs_logit:.3g} (dense: {e.dense_max_abs_diff:.3g})."]
    if report.int8:
        lines += _int8_lines(report.int8)
    lines += _pruning_lines(pr)
    for name in figures:
        lines += ["", f"![{Path(name).stem}]({name})"]
    lines += ["", "| layer | before | after |", "|---|---:|---:|"]
    lines += [f"| {layer.name} | {layer.before} | {layer.after} |" for layer in pr.layers]
    return "\n".join(lines) + "\n"


# --- Several runs side by side (slimdeploy compare) -----------------------------------------------

Run = tuple[str, RunReport]  # a run's name (its folder or file stem) and its report


def markers(name: str) -> tuple[str, str]:
    """The comments that fence a generated block of a hand-written Markdown document."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


BEGIN, END = markers("compare")


def sparsity_label(s: SparsitySummary) -> str:
    """The method, penalty and its parameters, e.g. ``proximal TL1 (a=1), λ=0.0001, β=100``."""
    if s.method == "none":
        return "none"
    name = f"Lp (p={s.p:g})" if s.penalty == "lp" else s.penalty.upper()
    if s.a is not None and s.penalty in ("tl1", "mcp", "scad"):
        name += f" (a={s.a:g})"
    extra = f", β={s.beta:g}" if s.method == "proximal" else ""
    return f"{s.method} {name}, λ={s.lam:g}{extra}"


def _ort_rows(report: RunReport) -> dict[tuple[int, int], LatencyRow]:
    """The report's onnxruntime latency rows by (batch, threads)."""
    return {(row.batch, row.threads): row for row in report.onnxruntime_rows()}


def _speedup(report: RunReport, setting: tuple[int, int]) -> str:
    row = _ort_rows(report).get(setting)
    return f"{row.speedup:.2f}×" if row else "–"


def _removed(before: float, after: float) -> str:
    return f"{100 * (1 - after / before):.0f} %"


def comparison_table(runs: list[Run]) -> str:
    """One Markdown row per run: accuracy at each step, what was removed, and the ORT speedups."""
    settings = list(dict.fromkeys(key for _, report in runs for key in _ort_rows(report)))
    head = ("| run | sparsity | acc. sparse-trained (%) | acc. pruned, no FT (%) | acc. fine-tuned (%) "
            "| channels removed | params removed | MACs removed (cut) "
            + "".join(f"| ORT speedup b{b}/{t}thr " for b, t in settings) + "|")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in runs:
        d, p, pr = r.dense, r.pruned, r.pruning
        lines.append(
            f"| {name} | {sparsity_label(r.sparsity)} | {_fmt(d.accuracy, '.2f')} "
            f"| {_fmt(r.pruned_no_finetune_accuracy, '.2f')} | {_fmt(p.accuracy, '.2f')} "
            f"| {_removed(pr.channels_total, pr.channels_kept)} | {_removed(d.params, p.params)} "
            f"| {_removed(d.macs, p.macs)} ({d.macs / p.macs:.2f}×) "
            + "".join(f"| {_speedup(r, s)} " for s in settings) + "|"
        )
    return "\n".join(lines) + "\n"


def _macs_millions(report: RunReport) -> list[float]:
    return [report.dense.macs / 1e6, report.pruned.macs / 1e6]


def _first_ort_p50(report: RunReport) -> list[float] | None:
    rows = report.onnxruntime_rows()
    return [rows[0].dense.p50, rows[0].pruned.p50] if rows else None


COMPARISON_PLOTS = (  # x axis of each plot, its label and its file name
    (_macs_millions, "MACs (millions, thop)", "accuracy_vs_macs.png"),
    (_first_ort_p50, "ORT p50 latency (ms, first bench setting)", "accuracy_vs_latency.png"),
)


def _plot_run(ax, name: str, report: RunReport, xs: list[float]) -> None:
    """Dense (×), pruned without fine-tuning (○) and fine-tuned (●), joined by a line."""
    ys = [report.dense.accuracy, report.pruned.accuracy]
    ax.plot(xs, ys, "-", color="lightgray", zorder=1)
    dot = ax.scatter(xs[1:], ys[1:], zorder=3, label=f"{name}: {sparsity_label(report.sparsity)}")
    ax.scatter(xs[1:], [report.pruned_no_finetune_accuracy], zorder=2, facecolors="none",
               edgecolors=dot.get_facecolor())
    ax.scatter(xs[:1], ys[:1], marker="x", color="gray", zorder=2)


def plot_comparison(runs: list[Run], out_dir: Path) -> list[Path]:
    """Accuracy against MACs and against ORT latency, one line per run; returns the files written."""
    written = []
    for x_of, xlabel, fname in COMPARISON_PLOTS:
        points = [(name, report, x_of(report)) for name, report in runs]
        points = [(name, report, xs) for name, report, xs in points if xs is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, report, xs in points:
            _plot_run(ax, name, report, xs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title("dense (×), pruned before (○) and after (●) fine-tuning")
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(out_dir / fname)
    return written


def write_marked(path: Path, text: str, name: str = "compare") -> None:
    """Replace the block between the ``name`` markers of an existing document, or write ``text`` to a new
    (or empty) file. A document without the markers is refused, not overwritten: it was written by hand."""
    begin, end = markers(name)
    doc = path.read_text() if path.is_file() else ""
    if begin in doc and end in doc:
        block = f"{begin}\n{text}{end}"
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, count=1, flags=re.S)
    elif doc.strip():
        raise InputError(f"{path}: has no block between {begin} and {end} to replace; add the two lines where "
                         "the table goes, or write to a new file")
    path.write_text(text)
