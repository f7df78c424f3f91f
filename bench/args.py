"""What the benchmarks share: the flags several of them take, defined once, and the writing of a result JSON.

One ``add_*`` function per flag rather than one parent parser: ``parents=[...]`` puts the parent's flags
first in ``--help``, and each benchmark lists its own flags around the shared ones in its own order, so a
benchmark adds each shared flag where it always stood and its ``--help`` stays as it was.

Nothing here imports torch at import time: a benchmark pays for what it uses (``bench.recipes`` imports
torch only once it scores a model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RESULTS = Path(__file__).resolve().parent / "results"


def add_json(p: argparse.ArgumentParser, default: Path | None) -> None:
    """``--json PATH``: where the result goes (``None``: nowhere unless given)."""
    p.add_argument("--json", type=Path, default=default)


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads (0 keeps torch's default); :func:`pick_bench_device`
    applies it."""
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda`` as ``dino_train.runtime.device.pick_device`` takes it."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def add_workers(p: argparse.ArgumentParser) -> None:
    """``--workers N [N ...]``: the DataLoader worker counts of the loader benchmarks, one row set each."""
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])


def pick_bench_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` (when not 0), then the device of ``--device``."""
    import torch

    from dino_train.runtime.device import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def write_result(path: Path, obj: object, indent: int | None = 2, announce: bool = True) -> Path:
    """``obj`` as JSON at ``path`` (parent folders made), written atomically so that an interrupted run
    or a reader such as ``python -m bench``'s summary never sees half a file; prints ``wrote PATH`` when
    ``announce``."""
    from dino_train.runtime.files import write_json

    if path.exists() and not path.is_file():
        # /dev/null, /dev/stdout, a pipe: an atomic write would rename its temporary file over the device
        # node (as root, /dev/null itself would become a regular file); these take the text directly.
        path.write_text(json.dumps(obj, indent=indent) + "\n")
    else:
        write_json(path, obj, indent=indent)
    if announce:
        print(f"wrote {path}")
    return path
