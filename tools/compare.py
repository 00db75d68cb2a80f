#!/usr/bin/env python
"""python tools/compare.py RUN [RUN ...] [--out DIR] [--md FILE]: the same as ``slimdeploy compare``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from slimdeploy.cli.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
