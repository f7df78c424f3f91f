"""Files that must never be half-written or silently wrong: atomic writes, and the error type that names
the file at fault. Used by training checkpoints and by every evaluation tool's outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {err}; the previous file there is intact") from err
    fsync_dir(path.parent)
    return path


def atomic_alias(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same content as ``src``: a hard link where the file system allows it."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the start of keys only (the release's str.replace also hit key middles)."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
