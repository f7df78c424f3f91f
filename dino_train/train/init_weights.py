"""``model.init_weights``: start a run from existing weights. Unlike a resume, the run starts at step 0 with
fresh optimizer, schedules and center; only the student's (and so the teacher's) weights come from the
file. Accepted: the release's backbone files and full checkpoints, ours (``checkpoint.pth``,
``teacher_backbone.pth``), timm ``.pth`` or ``.safetensors`` files; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
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


def adapt_input_bands(
    model: nn.Module, sd: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """RGB weights for a model of N input bands (``data.channels``): each input filter of 3 bands (the
    patch embedding of a ViT, a CNN's stem) becomes the mean of its RGB filters repeated N times and
    scaled by 3/N, so that an image whose N bands are equal gives the RGB model's response to a grey
    image of that value. Returns the weights and the keys adapted."""
    expected = model.state_dict()
    out, adapted = dict(sd), []
    for key, w in sd.items():
        want = expected.get(key)
        if want is None or w.ndim != 4 or want.ndim != 4 or w.shape[1] != 3 or want.shape[1] == 3:
            continue
        if w.shape[0] != want.shape[0] or w.shape[2:] != want.shape[2:]:
            continue
        n = want.shape[1]
        out[key] = w.mean(dim=1, keepdim=True).repeat(1, n, 1, 1) * (3.0 / n)
        adapted.append(key)
    return out, adapted


def init_from_file(student: nn.Module, path: str | Path, strict: bool = True, with_head: bool = True) -> str:
    """Load ``path`` into the multi-crop ``student`` (its ``backbone`` and, when asked and present, its
    ``head``); a full checkpoint gives its teacher. Returns a line saying what was loaded."""
    path = Path(path)
    obj, _ = read_file(path)
    raw, key = select_state_dict(obj, "teacher", path)
    backbone_sd, head_sd = _split(raw)
    backbone_sd, _ = drop_classifier(student.backbone, backbone_sd)
    backbone_sd, adapted = adapt_input_bands(student.backbone, backbone_sd)
    n = _load(student.backbone, backbone_sd, strict, path, "backbone")
    head = "fresh head"
    if with_head and head_sd:
        if state_dict_diff(student.head.state_dict(), head_sd):
            head = "fresh head (the file's head has another shape)"
        else:
            head = f"head from the file ({_load(student.head, head_sd, True, path, 'head')} tensors)"
    source = f"{path} [{key}]" if key else str(path)
    bands = ""
    if adapted:
        n_bands = student.backbone.state_dict()[adapted[0]].shape[1]
        bands = f" ({', '.join(adapted)} adapted from 3 bands to {n_bands})"
    return f"model.init_weights: {n} backbone tensors from {source}{bands}, {head}; starting at step 0"
