"""Interleaved ONNX Runtime benchmark: python tools/bench.py A.onnx B.onnx [--json out.json].

Runs slimdeploy/ortbench.py as the single file it is (numpy and onnxruntime only), without importing
the slimdeploy package, which needs torch.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "slimdeploy" / "ortbench.py"), run_name="__main__")
