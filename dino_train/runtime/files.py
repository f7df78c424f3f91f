"""Files that must never be half-written: atomic writes (temporary file, fsync, rename), one-line errors
naming the file, its folder and the free space when a write fails, and output folders checked before a
run starts. Loading is ``dino_train.runtime.safe_load``; checksums ``dino_train.runtime.checksums``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dino_train.runtime.checksums import file_sha256, sidecar_path, with_checksum
from dino_train.runtime.errors import CheckpointError, OutputDirError, UnsafeCheckpointError

__all__ = ["CheckpointError", "OutputDirError", "UnsafeCheckpointError"]


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename inside it survives a power cut; silently a no-op where unsupported."""
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


# ---------------------------------------------------------------------------------------------- loading


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def save_failure(path: Path, err: BaseException) -> CheckpointError:
    """The one-line error for a write of ``path`` that failed: the cause, the free space in its folder,
    and whether the previous file is still there."""
    try:
        free = f"{_human(shutil.disk_usage(path.parent).free)} free in {path.parent}"
    except OSError:
        free = f"free space in {path.parent} unknown"
    cause = (str(err).strip().splitlines() or [""])[0][:200]
    kept = (
        "the previous file there is intact"
        if path.exists()
        else "nothing was overwritten: earlier files there are intact"
    )
    return CheckpointError(f"could not write {path} ({type(err).__name__}: {cause}); {free}; {kept}")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_tmp(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_save(obj: Any, path: str | Path, checksum: bool = False, sidecar: bool = False) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    Any failure (a full disk raises OSError or torch's RuntimeError "unexpected pos") removes the
    temporary file and raises a one-line CheckpointError (:func:`save_failure`); the previous file at
    ``path`` is untouched. ``checksum``: store the tensor checksum in the (dict) object. ``sidecar``: write
    ``<path>.sha256`` for the file, for plain state dicts that must not gain a key.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    side = sidecar_path(path)
    try:
        _write_tmp(with_checksum(obj) if checksum else obj, tmp)
        digest = file_sha256(tmp) if sidecar else None
        side.unlink(missing_ok=True)  # never a stale sidecar beside the new file
        os.replace(tmp, path)
        if digest is not None:
            atomic_write_text(side, f"{digest}  {path.name}\n")
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, Exception) or isinstance(err, CheckpointError):
            raise
        raise save_failure(path, err) from err
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file atomically (temporary file, fsync, rename); CheckpointError on failure."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise save_failure(path, err) from err
    return path


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (``indent`` spaces, a final newline) through a temporary file, so that a reader
    never sees half a result; the parent folders are made. Every JSON file the project writes goes here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_alias(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same content as ``src``: a hard link where the file system allows it, else a
    copy. A failed copy (full disk) leaves ``dst`` as it was and raises CheckpointError."""
    tmp = _tmp_name(dst)
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise save_failure(dst, err) from err


def check_writable_dir(path: str | Path, what: str = "output directory") -> None:
    """Create ``path`` if needed and prove a file can be written in it, so a run fails at its start with
    one line naming the folder, not hours later at its first checkpoint. Raises OutputDirError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"{what} {path} is a file, not a folder") from None
    except OSError as err:
        raise OutputDirError(f"{what} {path} cannot be created: {err.strerror or err}") from None
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as err:
        raise OutputDirError(f"{what} {path} is not writable: {err.strerror or err}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``prefix`` + every key."""
    return {prefix + k: v for k, v in state.items()}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the start of keys only (the release's str.replace also hit key middles)."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
