#!/usr/bin/env python
"""python tools/compress.py RECIPE [--export onnx|onnx-int8] [--out DIR] [--set KEY=VALUE ...] [--resume]

The same as ``slimdeploy compress``; kept at this path because users and scripts run it from here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from slimdeploy.cli.compress import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
