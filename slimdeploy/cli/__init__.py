"""The ``slimdeploy`` command: ``slimdeploy compress | bench | compare ...``."""

from __future__ import annotations

import sys

COMMANDS = {
    "compress": "sparse training, pruning, export and benchmark of a recipe",
    "bench": "interleaved onnxruntime latency of ONNX files",
    "compare": "several runs' reports in one table and plots",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
        print(f"usage: slimdeploy {{{','.join(COMMANDS)}}} ...\n{usage}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    if command == "compress":
        from slimdeploy.cli.compress import main as run
    elif command == "bench":
        from slimdeploy.ortbench import main as run
    else:
        from slimdeploy.cli.compare import main as run
    return run(rest)
