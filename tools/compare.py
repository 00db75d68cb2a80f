#!/usr/bin/env python
"""Several runs in one table, and accuracy-vs-MACs and accuracy-vs-latency plots.

    python tools/compare.py RUN_DIR [RUN_DIR ...] [--out DIR] [--md table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_reports(dirs: list[str]) -> list[dict]:
    reports = []
    for d in dirs:
        path = Path(d) / "report.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: {path}: cannot read a report ({type(err).__name__})")
        report["run"] = str(d)
        reports.append(report)
    return reports


def _label(r: dict) -> str:
    s = r["sparsity"]
    return f"{r['model']} {s['method']}/{s['penalty']}" if s["method"] != "none" else f"{r['model']} dense"


def _latency(side: dict) -> float | None:
    return side["latency_ms"]["p50"] if side.get("latency_ms") else None


def table(reports: list[dict]) -> str:
    head = ("| run | model | sparsity | λ | acc. sparse (%) | acc. pruned, no FT (%) | acc. final (%) "
            "| channels kept | params kept | MACs kept | ORT p50 speedup |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        d, p, pr = r["dense"], r["pruned"], r["pruning"]
        speed = f"{_latency(d) / _latency(p):.2f}×" if _latency(d) and _latency(p) else "–"
        lines.append(
            f"| {Path(r['run']).name} | {r['model']} | {r['sparsity']['method']}/{r['sparsity']['penalty']} "
            f"| {r['sparsity']['lam']:g} | {d['accuracy']:.2f} | {r['pruned_no_finetune_accuracy']:.2f} "
            f"| {p['accuracy']:.2f} | {pr['channels_kept']}/{pr['channels_total']} "
            f"| {100 * p['params'] / d['params']:.1f} % | {100 * p['macs'] / d['macs']:.1f} % | {speed} |"
        )
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], out: Path) -> list[Path]:
    written = []
    for key, xlabel, fname in (("macs", "MACs (millions, thop)", "accuracy_vs_macs.png"),
                               ("latency", "ORT p50 latency (ms, first bench setting)", "accuracy_vs_latency.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        points = 0
        for r in reports:
            xs = [r["dense"]["macs"] / 1e6, r["pruned"]["macs"] / 1e6] if key == "macs" else \
                 [_latency(r["dense"]), _latency(r["pruned"])]
            if None in xs:
                continue
            ys = [r["dense"]["accuracy"], r["pruned"]["accuracy"]]
            ax.plot(xs, ys, "-", color="lightgray", zorder=1)
            ax.scatter(xs[1:], ys[1:], zorder=2, label=_label(r))
            ax.scatter(xs[:1], ys[:1], marker="x", color="gray", zorder=2)
            points += 1
        if not points:
            plt.close(fig)
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title("pruned (dots) vs dense (×)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories holding report.json")
    ap.add_argument("--out", default=".", help="folder for the plots")
    ap.add_argument("--md", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    reports = load_reports(args.runs)
    text = table(reports)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in plot(reports, out):
        print(f"wrote {path}")
    if args.md:
        Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
