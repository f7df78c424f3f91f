"""Getting a backbone in a notebook: pretrain one with DINO, or load one from a file, ready for inference."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_train.config import load_config
from dino_train.models import loading
from dino_train.runtime.device import pick_device
from dino_train.train import TrainResult, train

REPO_ROOT = Path(__file__).resolve().parents[1]
Overrides = Sequence[str] | Mapping[str, Any]


def best_device() -> torch.device:
    """CUDA (the current device) when torch sees one, else the CPU."""
    return pick_device("auto")


def load_backbone(
    path_or_name: str | Path,
    checkpoint_key: str = "teacher",
    weights: str | Path | None = None,
    device: torch.device | str | None = None,
    trust: bool = False,
) -> nn.Module:
    """A frozen backbone in eval mode on ``device`` (default: CUDA if available, else the CPU) whose
    forward maps (B, 3, H, W) ImageNet-normalised images to (B, D) features (the final-norm CLS token).

    ``path_or_name`` is one of:

    - our training checkpoint (``checkpoint.pth``; ``checkpoint_key`` picks ``teacher`` or ``student``),
      or ``teacher_backbone.pth``;
    - the original release's files (``dino_deitsmall16_pretrain.pth`` or a full ``checkpoint.pth``);
    - a timm model name, ``"timm:vit_small_patch16_224"`` or plain ``"vit_small_patch16_224"``, with
      ``weights`` a local weights file (nothing is downloaded).

    The architecture is read from the weights. What was loaded (arch, patch size, source, epoch, ignored
    keys) is in the dict ``model.load_info``. Errors are ``CheckpointError`` naming the file and the fault.
    A file holding pickled Python objects other than the release's plain ``args`` is refused unless
    ``trust=True``, which unpickles it fully and so runs any code it carries: only for files you trust.
    """
    name = str(path_or_name)
    if weights is not None and not name.startswith("timm:"):
        # With a weights file the first argument can only be a model name: say so if it is a file.
        if Path(name).is_file():
            raise ValueError(
                f"{name} is a file; pass it alone (weights= goes with a timm model name, "
                "e.g. 'timm:vit_small_patch16_224')"
            )
        name = f"timm:{name}"
    model, info = loading.load_backbone(name, checkpoint_key, weights=weights, trust=trust)
    model = model.to(torch.device(device) if device is not None else best_device())
    model.load_info = info  # nn.Module keeps plain attributes; the model itself stays a timm ViT
    return model.eval()


def _override_texts(overrides: Overrides) -> list[str]:
    """``section.key=value`` strings from a list of them or a {"section.key": value} mapping."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'section.key=value' strings, not {overrides!r}")
    if isinstance(overrides, Mapping):
        # JSON is YAML, and the config reads override values as YAML: lists, bools and quoted strings
        # survive the round trip unchanged.
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return [str(o) for o in overrides]


def resolve_config_path(config: str | Path) -> Path:
    """``config`` as given when it exists; else the same relative path under the repository root, so
    ``configs/demo.yaml`` works from a notebook's own folder too."""
    path = Path(config)
    if path.is_file() or path.is_absolute() or not (REPO_ROOT / path).is_file():
        return path
    return REPO_ROOT / path


def pretrain(config: str | Path | None = "configs/demo.yaml", overrides: Overrides = ()) -> TrainResult:
    """Run DINO pretraining in this process, exactly as ``dino_train/main.py --config CONFIG OVERRIDES``.

    ``config``: a recipe yaml (``None``: the schema defaults alone); a relative path missing from the
    working folder is looked up under the repository root. ``overrides``: ``["train.epochs=2", ...]``
    (values read as YAML) or ``{"train.epochs": 2, ...}``. The config is checked before any compute
    (``ConfigError`` names the key). A run whose ``train.output_dir`` holds a checkpoint resumes from it
    (``train.resume=false`` starts afresh). Returns the ``TrainResult`` (``output_dir``, ``step``,
    ``epoch``, the ``teacher`` and ``student`` modules, ``last_loss``, ...); the checkpoint is
    ``output_dir / "checkpoint.pth"``.
    """
    path = resolve_config_path(config) if config is not None else None
    return train(load_config(path, _override_texts(overrides)))
