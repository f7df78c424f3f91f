"""Checkpoints in the original release's layout, written atomically, with a rolling history for resume.

Layout (all plain tensors, numbers, strings and dicts, so ``torch.load(weights_only=True)`` reads it):
``student`` (``module.backbone.*``, ``module.head.*``, as a DDP student is saved), ``teacher``
(``backbone.*``, ``head.*``), ``optimizer``, ``epoch``, ``dino_loss`` ({"center"}), ``fp16_scaler`` (fp16
only), and ours: ``step``, ``batch_in_epoch``, ``world_size``, ``config``, ``format_version``, and
``_checksum`` (a SHA-256 over every tensor, checked on resume and by the eval loaders: torch's zip reader
does not check CRCs, so flipped bytes would otherwise load silently). Release files and our checkpoints from
before checksums load unverified. ``teacher_backbone.pth`` stays a plain {name: tensor} state dict (the
release's code loads it with ``strict=True``); its checksum is the sidecar ``teacher_backbone.pth.sha256``
and its backbone (timm name, kwargs, position rule) the sidecar ``teacher_backbone.pth.json``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_train.models.architecture import spec_sidecar_path, spec_sidecar_text
from dino_train.models.backbone import BackboneSpec
from dino_train.runtime.files import (
    CheckpointError,
    atomic_alias,
    atomic_save,
    atomic_write_text,
    fsync_dir,
    save_failure,
)
from dino_train.runtime.safe_load import load_verified

LATEST = "checkpoint.pth"
BACKBONE_EXPORT = "teacher_backbone.pth"
FORMAT_VERSION = 2  # 2: the head's last layer is weight_g, weight_v (the release's order)
_NUMBERED = re.compile(r"^checkpoint-step(\d{8})\.pth$")
REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "dino_loss")


def load_file(
    path: str | Path, map_location: str | torch.device = "cpu", trust: bool = False
) -> dict[str, Any]:
    """Read one of our checkpoints, verifying its checksum where it has one; raise CheckpointError naming
    the file if it is not one, is corrupt, or pickles code (unless ``trust``: see ``safe_torch_load``)."""
    path = Path(path)
    state = load_verified(path, map_location, trust)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a DINO training checkpoint: missing {', '.join(missing)}")
    return state


class CheckpointManager:
    """Numbered checkpoints ``checkpoint-stepNNNNNNNN.pth``, the last ``keep_last`` kept, ``checkpoint.pth``
    naming the newest (the file the release's tools look for), and ``checkpoint{epoch:04}.pth`` kept forever
    every ``saveckp_freq`` epochs."""

    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.dir = Path(output_dir)
        self.keep_last = keep_last

    def numbered(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.dir.glob("checkpoint-step*.pth"):
            m = _NUMBERED.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, state: dict[str, Any], step: int, keep_epoch: int | None = None) -> Path:
        """Write ``state`` (with its checksum) as the checkpoint of ``step``, point ``checkpoint.pth`` at it,
        prune old ones. A failed write raises CheckpointError and leaves the earlier checkpoints intact."""
        target = self.dir / f"checkpoint-step{step:08d}.pth"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise save_failure(target, err) from err
        path = atomic_save(state, target, checksum=True)
        atomic_alias(path, self.dir / LATEST)
        if keep_epoch is not None:
            atomic_alias(path, self.dir / f"checkpoint{keep_epoch:04d}.pth")
        fsync_dir(self.dir)
        for _, old in self.numbered()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that reads back whole and matches its checksum; a corrupt newest one is
        reported (a warning naming it) and skipped for the one before."""
        candidates = [p for _, p in reversed(self.numbered())]
        if not candidates and (self.dir / LATEST).exists():
            candidates = [self.dir / LATEST]
        errors = []
        for path in candidates:
            try:
                return load_file(path, map_location), path
            except CheckpointError as err:
                errors.append(str(err))
                warnings.warn(f"{err}; trying the checkpoint before it", stacklevel=2)
        if errors:
            raise CheckpointError(
                "no readable checkpoint in " + str(self.dir) + ":\n  " + "\n  ".join(errors)
            )
        return None


def export_backbone(
    model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, spec: BackboneSpec | None = None
) -> Path:
    """Backbone weights alone, keyed like the release's ``dino_deitsmall16_pretrain.pth``: a plain state
    dict, so the release's ``load_state_dict(strict=True)`` takes it; checksum in ``<path>.sha256``.
    ``spec``: the backbone's timm name, kwargs and position rule, written to ``<path>.json`` so that eval
    rebuilds any backbone from this file (the weights alone name the release's ViTs and ResNets only);
    without one, a sidecar left by an earlier export is removed rather than left to describe other weights."""
    weights = model if isinstance(model, Mapping) else model.state_dict()  # a state dict gathered by FSDP
    path = atomic_save({k: v.detach().cpu() for k, v in weights.items()}, path, sidecar=True)
    side = spec_sidecar_path(path)
    if spec is None:
        side.unlink(missing_ok=True)
    else:
        atomic_write_text(side, spec_sidecar_text(spec.as_dict()))
    return path
