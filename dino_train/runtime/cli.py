"""What every command-line tool of the project shares and that needs no torch: the ``--help`` layout
and the default number of image-decoding workers. Light on purpose: ``dino-report`` and the Slurm
launchers import it too."""

from __future__ import annotations

import argparse
import os

MAX_DEFAULT_WORKERS = 4  # beyond ~4 decoding processes per rank, small evaluation images gain nothing


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the module docstring's layout and shows each flag's default.

    A default that says nothing (None, False, an empty list: an unset option, an off switch, no
    positional values) is left out, and so is one the help text already states (it names "default")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default  # identity checks: a default of 0 is worth showing, False is not
        empty = isinstance(default, list | tuple) and not default
        if default is None or default is False or empty or "default" in text.lower():
            return text
        return super()._get_help_string(action) or ""


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity: a Slurm allocation or a ``taskset``, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Image-decoding worker processes for an evaluation tool: one core fewer than this process may use
    (the main process needs one), at most 4, so a 2-core machine gets 1 and torch's DataLoader never
    warns that the workers outnumber the cores."""
    return max(0, min(MAX_DEFAULT_WORKERS, machine_cores() - 1))
