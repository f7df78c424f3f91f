"""Whether a progress bar may draw: the one rule for training's monitor and the evaluation tools.

A bar redraws itself with carriage returns; on a terminal that reads as one moving line, in a file (a
redirected log, a Slurm job's output) it becomes one line of thousands of characters with the messages
spliced into it. So bars are drawn only on a terminal, and never under Slurm, whose logs are files even
when ``srun --pty`` makes stderr look like a terminal."""

from __future__ import annotations

import os
import sys
from typing import Any


def use_progress_bar(setting: bool | str = "auto", stream: Any = None) -> bool:
    """True when a bar should draw on ``stream`` (default ``sys.stderr``, where tqdm writes).

    ``setting``: False (``--no-progress``, ``train.progress_bar=false``) is always off; True and "auto"
    both mean "where it can be read": on a TTY, outside a Slurm job (``SLURM_JOB_ID`` unset)."""
    stream = sys.stderr if stream is None else stream
    if setting is False:
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        tty = False
    return tty and "SLURM_JOB_ID" not in os.environ
