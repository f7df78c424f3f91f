"""The one torch loader for files users pass in: it never runs code from the file.

``torch.load(weights_only=True)`` with a short allow-list of the plain classes the release's checkpoints
pickle (``argparse.Namespace``; ``pathlib.PosixPath``/``PurePosixPath``, which forks put in ``args`` and
whose reconstruction is string handling only). Anything else (``os.system``, ``exec``, ``open``, a
custom class) is refused with an :class:`UnsafeCheckpointError` naming it; only ``trust=True`` (the
CLIs' ``--trust-checkpoint``) falls back to the full unpickler, which can run code from the file.
Checksums are verified where present (``dino_train.runtime.checksums``)."""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from dino_train.runtime.checksums import verify_checksum, verify_sidecar
from dino_train.runtime.errors import CheckpointError, UnsafeCheckpointError

# Classes torch's weights-only unpickler may rebuild besides tensors and plain containers. Each one's
# reconstruction only stores its arguments: no I/O, no imports, no calls into user code.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath)
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_error_reason(err: BaseException) -> str:
    """The informative part of a torch.load error, on one line: torch's advice to rerun with
    weights_only=False is wrong for a file that is not a checkpoint at all, and unsafe for the rest."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    return f"{type(err).__name__}: {text[:300]}"


def refused_global(err: BaseException) -> str | None:
    """The dotted name of the class or function torch's safe unpickler refused, or None when ``err`` is
    not such a refusal (garbage bytes also raise UnpicklingError, with "Unsupported operand")."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    text = str(err)
    match = _GLOBAL.search(text)
    if match:  # torch prints builtins without their module: "GLOBAL exec"
        return match.group(1) if "." in match.group(1) else f"builtins.{match.group(1)}"
    if "allowlist" in text or "Unsupported global" in text:
        return "an object outside the allow-list"
    return None


def safe_torch_load(path: str | Path, map_location: Any = "cpu", trust: bool = False) -> Any:
    """``torch.load`` that never runs code from the file unless ``trust`` is set.

    Reads with ``weights_only=True`` and :data:`SAFE_GLOBALS`. A refused global raises CheckpointError
    naming the file and the global; with ``trust=True`` (only then) the file is read again with the full
    unpickler, after a warning on stderr; without it the error is an UnsafeCheckpointError. Every other
    failure (missing, garbage, truncated zip) is a CheckpointError "<path> is not a checkpoint (<reason>)".
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        name = refused_global(err)
        if name is None:
            raise CheckpointError(f"{path} is not a checkpoint ({load_error_reason(err)})") from err
        if not trust:
            raise UnsafeCheckpointError(
                f"{path} holds a pickled {name}, which could run code when loaded, so it was refused. "
                "If you trust this file, load it with --trust-checkpoint (trust=True in Python)",
                name,
            ) from err
    return _trusted_load(path, map_location, name)


def _trusted_load(path: Path, map_location: Any, name: str) -> Any:
    """The full unpickler, for a file the user vouched for; says so loudly first."""
    print(
        f"WARNING: loading {path} with weights_only=False because you trust it (--trust-checkpoint): its "
        f"pickled {name} can run arbitrary code",
        file=sys.stderr,
        flush=True,
    )
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path} is not a checkpoint ({load_error_reason(err)})") from err


def load_verified(path: str | Path, map_location: Any = "cpu", trust: bool = False) -> Any:
    """:func:`safe_torch_load`, then the file's sidecar checksum and embedded tensor checksum where
    present (a CheckpointError naming the file on a mismatch). The checksum entry is removed."""
    path = Path(path)
    verify_sidecar(path)
    return verify_checksum(safe_torch_load(path, map_location, trust), path)


# -------------------------------------------------------------------------------------------- checksums
