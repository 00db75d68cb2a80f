"""report.json, report.md and the plots beside them."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def write_json(report: dict, out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=1))
    return path


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


def plot_widths(layers: list[dict], path: Path) -> None:
    """Kept channels per layer: before/after bars."""
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(layers) + 2), 3.5))
    x = np.arange(len(layers))
    ax.bar(x, [l["before"] for l in layers], color="lightgray", label="dense")
    ax.bar(x, [l["after"] for l in layers], color="tab:green", label="pruned")
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("output channels")
    ax.set_xlim(-1, len(layers))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(latency: list[dict], path: Path) -> None:
    """p50 latency per benchmark setting, dense vs pruned."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(latency))
    ax.bar(x - 0.2, [r["dense"]["p50"] for r in latency], 0.4, label="dense", color="gray")
    ax.bar(x + 0.2, [r["pruned"]["p50"] for r in latency], 0.4, label="pruned", color="tab:green")
    ax.set_xticks(x, [f"{r['backend']}\nbatch {r['batch']}, {r['threads']} thr" for r in latency], fontsize=8)
    ax.set_ylabel("p50 latency (ms per batch)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, spec=",") -> str:
    return "–" if v is None else format(v, spec)


def write_markdown(report: dict, out_dir: Path) -> Path:
    d, p = report["dense"], report["pruned"]
    ratio = lambda a, b: f"{a / b:.2f}×" if a and b else "–"  # noqa: E731
    lines = [
        f"# {report['recipe']}: {report['model']} on {report['dataset']}",
        "",
        f"Sparsity: {report['sparsity']['method']} / {report['sparsity']['penalty']} "
        f"(λ = {report['sparsity']['lam']}); plan: {report['pruning']['how']}; "
        f"training {report['train']['epochs']} epochs in {report['train']['seconds']:.0f} s, "
        f"fine-tuning {report['finetune']['epochs']} epochs.",
        "",
        "| | dense | pruned | dense ÷ pruned |",
        "|---|---:|---:|---:|",
        f"| top-1 accuracy (%) | {_fmt(d['accuracy'], '.2f')} | {_fmt(p['accuracy'], '.2f')} | |",
        f"| accuracy right after pruning (%) | | {_fmt(report['pruned_no_finetune_accuracy'], '.2f')} | |",
        f"| params | {d['params']:,} | {p['params']:,} | {ratio(d['params'], p['params'])} |",
        f"| MACs ({report['macs_counter']}) | {d['macs']:,} | {p['macs']:,} | {ratio(d['macs'], p['macs'])} |",
        f"| MACs (torch.utils.flop_counter) | {d['macs_flop_counter']:,} | {p['macs_flop_counter']:,} | "
        f"{ratio(d['macs_flop_counter'], p['macs_flop_counter'])} |",
    ]
    if d.get("onnx_bytes"):
        lines.append(f"| ONNX file (MB) | {d['onnx_bytes'] / 1e6:.2f} | {p['onnx_bytes'] / 1e6:.2f} | "
                     f"{ratio(d['onnx_bytes'], p['onnx_bytes'])} |")
    if d.get("peak_rss_mb"):
        lines.append(f"| peak RSS, ORT load + 1 batch (MiB) | {d['peak_rss_mb']:.1f} | {p['peak_rss_mb']:.1f} | "
                     f"{ratio(d['peak_rss_mb'], p['peak_rss_mb'])} |")
    macs_cut = d["macs"] / p["macs"] if p["macs"] else None
    for r in report["latency"]:
        speedup = r["dense"]["p50"] / r["pruned"]["p50"]
        lines.append(
            f"| {r['backend']} p50 / p90 (ms), batch {r['batch']}, {r['threads']} thread(s) | "
            f"{r['dense']['p50']:.3f} / {r['dense']['p90']:.3f} | {r['pruned']['p50']:.3f} / {r['pruned']['p90']:.3f} | "
            f"{speedup:.2f}× (÷ MACs cut: {speedup / macs_cut:.2f}) |"
        )
    if report.get("export"):
        e = report["export"]
        lines += ["", f"ONNX check (opset {e['opset']}): max |ORT − PyTorch| = {e['max_abs_diff']:.3g} "
                      f"with max |logit| = {e['max_abs_logit']:.3g} (dense: {e['dense_max_abs_diff']:.3g})."]
    if report.get("int8"):
        q = report["int8"]
        qd, qp = q["dense"], q["pruned"]
        lines += ["", f"INT8: static QDQ for {q['target']}, {q['activation']} activations, {q['weights']} weights"
                      f"{' (7-bit range)' if q['reduce_range'] else ''}, {q['calibration']} calibration on "
                      f"{q['calibration_images']} training images; FP32 timed beside it in the same sessions.",
                  "", "| INT8 | dense | pruned |", "|---|---:|---:|",
                  f"| top-1 accuracy (%), INT8 / FP32 ONNX | {_fmt(qd['accuracy'], '.2f')} / {_fmt(qd['fp32_accuracy'], '.2f')} | "
                  f"{_fmt(qp['accuracy'], '.2f')} / {_fmt(qp['fp32_accuracy'], '.2f')} |",
                  f"| ONNX file (MB) | {qd['onnx_bytes'] / 1e6:.2f} | {qp['onnx_bytes'] / 1e6:.2f} |"]
        for r in q["latency"]:
            fast = r["speedup_vs_fp32"]
            lines.append(f"| ORT p50 (ms) INT8 / FP32, batch {r['batch']}, {r['threads']} thread(s) | "
                         f"{r['dense']['p50']:.3f} / {r['dense_fp32']['p50']:.3f} ({fast['dense']:.2f}×) | "
                         f"{r['pruned']['p50']:.3f} / {r['pruned_fp32']['p50']:.3f} ({fast['pruned']:.2f}×) |")
    pr = report["pruning"]
    lines += [
        "",
        f"Channels kept: {pr['channels_kept']} of {pr['channels_total']} "
        f"({100 * pr['channels_kept'] / max(pr['channels_total'], 1):.1f} %).",
    ]
    if pr.get("proximal"):
        z = pr["proximal"]
        lines.append(f"Proximal NS: {z['xi_zeros']} of {z['channels']} ξ are exactly zero; "
                     f"{z['gamma_nonzero_at_xi_zero']} of their γ are not (max |γ| {z['gamma_max_abs_at_xi_zero']:.3g}).")
    lines += ["", "![scores](scores.png)", "", "![widths](widths.png)"]
    if report["latency"]:
        lines += ["", "![latency](latency.png)"]
    lines += ["", "| layer | before | after |", "|---|---:|---:|"]
    lines += [f"| {l['name']} | {l['before']} | {l['after']} |" for l in pr["layers"]]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
