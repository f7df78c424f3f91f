"""Errors about files: each message names the file at fault."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


class OutputDirError(CheckpointError):
    """An output directory that cannot be created or written; the message names it."""


class UnsafeCheckpointError(CheckpointError):
    """A file whose pickle needs a class or function outside the allow-list (``global_name``): loading it
    with the full unpickler could run code, so only a caller that trusts the file may."""

    def __init__(self, message: str, global_name: str):
        super().__init__(message)
        self.global_name = global_name


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""
