"""Several runs in one table, and accuracy-vs-MACs and accuracy-vs-latency plots.

    slimdeploy compare RUN [RUN ...] [--out DIR] [--md FILE]     (or python tools/compare.py ...)

A RUN is a run directory holding report.json, or a report .json file itself. If FILE already
holds the markers below, only the text between them is replaced, so a hand-written document
(docs/results.md) can carry a table that is always regenerated from the reports:

    <!-- compare:begin -->
    <!-- compare:end -->
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


def load_reports(paths: list[str]) -> list[dict]:
    reports = []
    for p in map(Path, paths):
        path = p if p.suffix == ".json" else p / "report.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: {path}: cannot read a report ({type(err).__name__})")
        missing = [k for k in ("dense", "pruned", "pruning", "sparsity", "latency") if k not in report]
        if missing:
            raise SystemExit(f"error: {path}: not a slimdeploy report (no {', '.join(missing)})")
        report["run"] = p.stem if p.suffix == ".json" else p.name
        reports.append(report)
    return reports


def _sparsity(r: dict) -> str:
    s = r["sparsity"]
    if s["method"] == "none":
        return "none"
    name = f"Lp (p={s['p']:g})" if s["penalty"] == "lp" else s["penalty"].upper()
    if s.get("a") is not None and s["penalty"] in ("tl1", "mcp", "scad"):
        name += f" (a={s['a']:g})"
    extra = f", β={s['beta']:g}" if s["method"] == "proximal" else ""
    return f"{s['method']} {name}, λ={s['lam']:g}{extra}"


def _ort_rows(r: dict) -> dict[tuple[int, int], dict]:
    """The report's onnxruntime latency rows by (batch, threads)."""
    return {(row["batch"], row["threads"]): row for row in r["latency"] if row["backend"] == "onnxruntime"}


def _ort_settings(reports: list[dict]) -> list[tuple[int, int]]:
    return list(dict.fromkeys(key for r in reports for key in _ort_rows(r)))


def _speedup(r: dict, setting: tuple[int, int]) -> str:
    row = _ort_rows(r).get(setting)
    return f"{row['dense']['p50'] / row['pruned']['p50']:.2f}×" if row else "–"


def _removed(before: float, after: float) -> str:
    return f"{100 * (1 - after / before):.0f} %"


def table(reports: list[dict]) -> str:
    settings = _ort_settings(reports)
    head = ("| run | sparsity | acc. sparse-trained (%) | acc. pruned, no FT (%) | acc. fine-tuned (%) "
            "| channels removed | params removed | MACs removed (cut) "
            + "".join(f"| ORT speedup b{b}/{t}thr " for b, t in settings) + "|")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        d, p, pr = r["dense"], r["pruned"], r["pruning"]
        lines.append(
            f"| {r['run']} | {_sparsity(r)} | {d['accuracy']:.2f} | {r['pruned_no_finetune_accuracy']:.2f} "
            f"| {p['accuracy']:.2f} | {_removed(pr['channels_total'], pr['channels_kept'])} "
            f"| {_removed(d['params'], p['params'])} "
            f"| {_removed(d['macs'], p['macs'])} ({d['macs'] / p['macs']:.2f}×) "
            + "".join(f"| {_speedup(r, s)} " for s in settings) + "|"
        )
    return "\n".join(lines) + "\n"


def _first_ort_p50(r: dict, side: str) -> float | None:
    rows = list(_ort_rows(r).values())
    return rows[0][side]["p50"] if rows else None


def plot(reports: list[dict], out: Path) -> list[Path]:
    """Dense (×), pruned without fine-tuning (○) and fine-tuned (●) per run, joined by a line."""
    written = []
    for key, xlabel, fname in (("macs", "MACs (millions, thop)", "accuracy_vs_macs.png"),
                               ("latency", "ORT p50 latency (ms, first bench setting)", "accuracy_vs_latency.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        points = 0
        for r in reports:
            xs = [r["dense"]["macs"] / 1e6, r["pruned"]["macs"] / 1e6] if key == "macs" else \
                 [_first_ort_p50(r, "dense"), _first_ort_p50(r, "pruned")]
            if None in xs:
                continue
            ys = [r["dense"]["accuracy"], r["pruned"]["accuracy"]]
            ax.plot(xs, ys, "-", color="lightgray", zorder=1)
            dot = ax.scatter(xs[1:], ys[1:], zorder=3, label=f"{r['run']}: {_sparsity(r)}")
            ax.scatter(xs[1:], [r["pruned_no_finetune_accuracy"]], zorder=2, facecolors="none",
                       edgecolors=dot.get_facecolor())
            ax.scatter(xs[:1], ys[:1], marker="x", color="gray", zorder=2)
            points += 1
        if not points:
            plt.close(fig)
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title("dense (×), pruned before (○) and after (●) fine-tuning")
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)
    return written


def write_markdown(path: Path, text: str) -> None:
    """Replace the marked block of an existing document, or write the table alone."""
    doc = path.read_text() if path.is_file() else ""
    if BEGIN in doc and END in doc:
        block = f"{BEGIN}\n{text}{END}"
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, count=1, flags=re.S)
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories holding report.json, or report .json files")
    ap.add_argument("--out", default=".", help="folder for the plots")
    ap.add_argument("--md", help="write the table to this Markdown file (between its markers, if it has them)")
    args = ap.parse_args(argv)
    reports = load_reports(args.runs)
    text = table(reports)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in plot(reports, out):
        print(f"wrote {path}")
    if args.md:
        write_markdown(Path(args.md), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
