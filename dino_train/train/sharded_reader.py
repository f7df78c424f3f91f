"""Reading a sharded state (``sharded/stepNNNNNNNN/``) without running code from it, and checking that it
is whole before any rank loads it.

torch.distributed.checkpoint's own reader unpickles ``.metadata`` with the full unpickler, which would run
whatever a crafted file names; this reader admits only the classes a checkpoint's metadata is made of (the
tensor data files are already read with ``torch.load(weights_only=True)``). A missing or short data file
(a rank's file lost in a copy, a save cut off) is named here, where torch's load would end in a traceback
from inside its gather on every rank."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from dino_train.runtime.files import CheckpointError

_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_METADATA, n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(folder: Path) -> Metadata:
    """``folder/.metadata`` read with only the metadata's own classes admitted; a CheckpointError naming
    the file otherwise."""
    path = folder / ".metadata"
    try:
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} cannot be read as a sharded state's metadata: {err}") from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not a sharded state's metadata")
    return metadata


def checked_reader(folder: Path) -> FileSystemReader:
    """A reader for ``torch.distributed.checkpoint.load`` of ``folder``, after checking that every data file
    its metadata names is there and long enough (CheckpointError naming the first that is not)."""
    needed: dict[str, int] = {}
    for info in read_metadata(folder).storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the sharded state {folder} is incomplete")
        if file.stat().st_size < length:
            raise CheckpointError(
                f"{file} is cut short: {file.stat().st_size} bytes where its metadata needs {length}"
            )
    return _SafeReader(str(folder))
