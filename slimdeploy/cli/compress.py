"""Compress a CNN by network slimming: slimdeploy compress RECIPE [--export onnx] [--out DIR] ...
(also ``python tools/compress.py ...``).

Exit codes: 0 success; 2 bad recipe or argument (one line on stderr naming the key); 1 other failures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from slimdeploy.exports import EXPORTS  # torch-free, unlike slimdeploy.pipeline: --help starts fast


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for a bad recipe
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(description="Sparse training, graph pruning, ONNX export and benchmark of a CNN.")
    ap.add_argument("recipe", help="recipe YAML file (see recipes/)")
    ap.add_argument("--export", choices=EXPORTS.names(), help="export dense and pruned models: " + "; ".join(
        f"{name}: {description}" for name, description in EXPORTS.describe().items()))
    ap.add_argument("--out", help="run directory (default: runs/<recipe file stem>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set train.epochs=2 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoints")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or log lines, only warnings and errors")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from slimdeploy import pipeline
    from slimdeploy.errors import SlimdeployError
    from slimdeploy.logs import setup_logging
    from slimdeploy.recipe import load_recipe

    setup_logging(quiet=args.quiet)

    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        result = pipeline.run(recipe, out, recipe_name=Path(args.recipe).stem, export_format=args.export,
                              resume=args.resume, progress=not args.quiet)
    except SlimdeployError as err:  # 2 for input the user can fix, 1 for failures at run time
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"error: {err.filename or out}: {err.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; continue with --resume (run directory {out})", file=sys.stderr)
        return 1
    except Exception as err:  # one line for the user; SLIMDEPLOY_DEBUG=1 shows the traceback
        if os.environ.get("SLIMDEPLOY_DEBUG"):
            raise
        print(f"error: {type(err).__name__}: {err} (SLIMDEPLOY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    r = result.run_report
    if r is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(
        f"{out}: params {r.dense.params:,} → {r.pruned.params:,}, MACs {r.dense.macs:,} → {r.pruned.macs:,}, "
        f"accuracy {r.dense.accuracy:.2f}% → {r.pruned.accuracy:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
