"""``model.init_weights``: start a run from existing weights. Unlike a resume, the run starts at step 0 with
fresh optimizer, schedules and center; only the student's (and so the teacher's) weights come from the
file. Accepted: the release's backbone files and full checkpoints, ours (``checkpoint.pth``,
``teacher_backbone.pth``), timm ``.pth`` or ``.safetensors`` files; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dino_train.models.loading import drop_classifier, read_file, select_state_dict, state_dict_diff
from dino_train.runtime.files import CheckpointError, strip_prefix


def _split(sd: dict) -> tuple[dict, dict]:
    """(backbone weights, head weights) of a state dict with or without the wrapper's prefixes."""
    sd = strip_prefix(sd, "module.")
    if not any(k.startswith("backbone.") for k in sd):
        return sd, {}
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    head = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
    return backbone, head


def _load(module: nn.Module, sd: dict, strict: bool, path: Path, what: str) -> int:
    diff = state_dict_diff(module.state_dict(), sd)
    if diff and strict:
        raise CheckpointError(
            f"model.init_weights: {path}: the {what} weights do not fit this model:\n{diff}\n"
            "(model.init_strict=false loads the weights that fit)"
        )
    expected = module.state_dict()
    usable = {k: v for k, v in sd.items() if k in expected and expected[k].shape == v.shape}
    module.load_state_dict(usable, strict=False)
    return len(usable)


def init_from_file(student: nn.Module, path: str | Path, strict: bool = True, with_head: bool = True) -> str:
    """Load ``path`` into the multi-crop ``student`` (its ``backbone`` and, when asked and present, its
    ``head``); a full checkpoint gives its teacher. Returns a line saying what was loaded."""
    path = Path(path)
    obj, _ = read_file(path)
    raw, key = select_state_dict(obj, "teacher", path)
    backbone_sd, head_sd = _split(raw)
    backbone_sd, _ = drop_classifier(student.backbone, backbone_sd)
    n = _load(student.backbone, backbone_sd, strict, path, "backbone")
    head = "fresh head"
    if with_head and head_sd:
        if state_dict_diff(student.head.state_dict(), head_sd):
            head = "fresh head (the file's head has another shape)"
        else:
            head = f"head from the file ({_load(student.head, head_sd, True, path, 'head')} tensors)"
    source = f"{path} [{key}]" if key else str(path)
    return f"model.init_weights: {n} backbone tensors from {source}, {head}; starting at step 0"
