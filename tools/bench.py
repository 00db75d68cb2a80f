"""Interleaved ONNX Runtime benchmark: python tools/bench.py A.onnx B.onnx [--json out.json]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdeploy.ortbench import main  # noqa: E402  (needs numpy + onnxruntime only)

if __name__ == "__main__":
    sys.exit(main())
