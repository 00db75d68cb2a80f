"""Console output of the command line: the package's log lines through one handler that prints with
``tqdm.write`` (progress bars stay intact), from rank 0 only under torchrun.

Modules log to ``logging.getLogger(__name__)``; without `setup_logging` (a library caller) their INFO
lines go nowhere.
"""

from __future__ import annotations

import logging
import os

from tqdm import tqdm

PACKAGE = "slimdeploy"


def on_console_rank() -> bool:
    """Whether this process talks to the console: a single process, or torchrun's rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


class TqdmHandler(logging.Handler):
    """Writes each record above any progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # logging's contract: a broken stream never breaks the caller
            self.handleError(record)


class ConsoleRankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return on_console_rank()


def setup_logging(quiet: bool = False) -> None:
    """One handler on the package logger (replacing an earlier one); ``quiet`` keeps warnings and errors only."""
    logger = logging.getLogger(PACKAGE)
    for old in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
        logger.removeHandler(old)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(ConsoleRankFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def progress_bars(wanted: bool) -> bool:
    """Progress bars, like log lines, on the console rank only."""
    return wanted and on_console_rank()
