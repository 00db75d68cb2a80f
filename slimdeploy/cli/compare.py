"""Several runs in one table, and accuracy-vs-MACs and accuracy-vs-latency plots.

    slimdeploy compare RUN [RUN ...] [--out DIR] [--md FILE]     (or python tools/compare.py ...)

A RUN is a run directory holding report.json, or a report .json file itself. If FILE already
holds the markers below, only the text between them is replaced, so a hand-written document
(docs/results.md) can carry a table that is always regenerated from the reports; an existing FILE
without them is refused, not overwritten:

    <!-- compare:begin -->
    <!-- compare:end -->
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slimdeploy.errors import SlimdeployError
from slimdeploy.report import Run, comparison_table, plot_comparison, write_marked
from slimdeploy.results import RunReport
from slimdeploy.rundir import RunDir


def load_runs(paths: list[str]) -> list[Run]:
    """Each run's name (its folder, or the file's stem) and its report."""
    runs = []
    for p in map(Path, paths):
        if p.suffix == ".json":
            runs.append((p.stem, RunReport.from_json(p)))
        else:
            runs.append((p.name, RunReport.from_json(RunDir(p).report_json)))
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories holding report.json, or report .json files")
    ap.add_argument("--out", default=".", help="folder for the plots")
    ap.add_argument("--md", help="write the table to this Markdown file: a new one, or between the markers of "
                    "an existing one")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except SlimdeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    text = comparison_table(runs)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in plot_comparison(runs, out):
        print(f"wrote {path}")
    if args.md:
        try:
            write_marked(Path(args.md), text)
        except SlimdeployError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
