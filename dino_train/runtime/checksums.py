"""Content checksums: torch's zip reader does not check CRCs, so a flipped byte in a tensor's storage loads
without complaint. Checkpoints we write carry ``"_checksum": {"algorithm": "sha256-tensors-v1", "digest":
...}``, a SHA-256 over every tensor (key path, dtype, shape, bytes) in a fixed order; plain state dicts
that other code loads with ``load_state_dict(strict=True)`` get a ``<file>.sha256`` sidecar instead (the
``sha256sum`` format of the whole file, so ``sha256sum -c`` checks it too)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from dino_train.runtime.errors import CheckpointError

CHECKSUM_KEY = "_checksum"
CHECKSUM_ALGORITHM = "sha256-tensors-v1"
SIDECAR_SUFFIX = ".sha256"
_CHUNK = 1 << 22


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's elements as raw bytes, without a copy for contiguous CPU tensors."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    t = t.cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _hash_into(h: Any, obj: Any, where: str) -> None:
    """Feed every tensor below ``obj`` into ``h``: its key path, dtype, shape, then its bytes. Dict
    entries go in sorted key order, so equal states hash alike however they were built."""
    if isinstance(obj, torch.Tensor):
        h.update(f"{where}|{obj.dtype}|{tuple(obj.shape)}|".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, dict):
        for key, value in sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0]))):
            _hash_into(h, value, f"{where}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _hash_into(h, value, f"{where}[{i}]")


def tensor_digest(obj: Any) -> str:
    """SHA-256 (hex) of every tensor in a nested dict/list state, as :data:`CHECKSUM_ALGORITHM` defines."""
    h = hashlib.sha256()
    _hash_into(h, obj, "")
    return h.hexdigest()


def with_checksum(state: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``state`` with its tensor checksum under :data:`CHECKSUM_KEY`."""
    body = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    return body | {CHECKSUM_KEY: {"algorithm": CHECKSUM_ALGORITHM, "digest": tensor_digest(body)}}


def verify_checksum(obj: Any, path: str | Path) -> Any:
    """``obj`` without its checksum entry, after checking it; objects without one pass unchanged
    (release files, our checkpoints from before checksums)."""
    if not isinstance(obj, dict) or CHECKSUM_KEY not in obj:
        return obj
    record = obj[CHECKSUM_KEY]
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    algorithm = record.get("algorithm") if isinstance(record, dict) else None
    if algorithm != CHECKSUM_ALGORITHM:
        raise CheckpointError(
            f"{path}: unknown checksum algorithm {algorithm!r} (this version knows {CHECKSUM_ALGORITHM})"
        )
    digest = tensor_digest(body)
    if digest != record.get("digest"):
        raise CheckpointError(
            f"{path}: checksum mismatch: its tensors hash to {digest[:16]}..., the file recorded "
            f"{str(record.get('digest'))[:16]}...; the file is corrupt (damaged on disk or in a copy)"
        )
    return body


def sidecar_path(path: str | Path) -> Path:
    """``<file>.sha256``, next to the file it checks."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_sidecar(path: str | Path) -> bool:
    """Check ``path`` against its ``.sha256`` sidecar; False when there is none, CheckpointError naming
    both files on a mismatch."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file() or not path.is_file():
        return False
    recorded = side.read_text().split()[:1]
    actual = file_sha256(path)
    if recorded != [actual]:
        raise CheckpointError(
            f"{path}: checksum mismatch with {side}: the file hashes to {actual[:16]}..., the sidecar says "
            f"{(recorded or ['nothing'])[0][:16]}...; the file is corrupt, or was replaced by hand (then "
            "delete the sidecar)"
        )
    return True


# -------------------------------------------------------------------------------------------- writing
