"""Distillation (``distill.*``): a frozen, trained teacher (its backbone and its DINO head, read from any
file the eval tools load) gives the targets of DINO's and iBOT's losses in place of the EMA teacher, as in
DINOv3's distillation of its ViT-7B into smaller models (and dinov2's before it). The student's own EMA is
still kept and is what checkpoints hold as ``teacher``, so the eval tools, the monitor and
``teacher_backbone.pth`` score the distilled student. The frozen teacher is not saved; the checkpoint
records which file it was and a fingerprint of its weights, and a resume with other weights is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_train.config import Config, ConfigError
from dino_train.models.backbone import NotAViTError, check_crop_size, patch_size_of
from dino_train.models.head import head_from_state_dict
from dino_train.models.loading import load_backbone, read_file, select_state_dict
from dino_train.models.wrapper import MultiCropWrapper
from dino_train.runtime.files import CheckpointError, strip_prefix
from dino_train.train.spec import run_band_stats

CHECKPOINT_KEY = "distill_teacher"  # the checkpoint's record of the frozen teacher: path and fingerprint


def _heads(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The DINO head's and (iBOT's separate) patch head's weights of the file's ``key`` network."""
    obj, _ = read_file(path)
    raw, _ = select_state_dict(obj, key, path)
    sd = strip_prefix(raw, "module.")
    part = lambda prefix: {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    return part("head."), part("patch_head.")


def _no_head(path: Path | str) -> ConfigError:
    return ConfigError(
        f"distill.teacher: {path} holds a backbone without its DINO head, so it has no targets to give. "
        "Train a head on the frozen backbone first (continued pretraining: model.init_weights=<the file> "
        "train.freeze_backbone_epochs=E train.epochs=E, docs/distillation.md) and distil from that run's "
        "checkpoint.pth"
    )


def fingerprint(model: nn.Module) -> float:
    """A number that changes with any weight: the float64 sum of every parameter's absolute values,
    each scaled by its position so that swapped tensors differ too."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(model.parameters(), 1):
        total += i * p.detach().double().abs().sum().cpu()
    return float(total)


def load_teacher(cfg: Config, student: MultiCropWrapper) -> tuple[MultiCropWrapper, dict[str, Any]]:
    """The frozen teacher of ``distill.teacher`` on the CPU, checked against the config and the
    ``student``, and a record for the checkpoint (path, fingerprint, what it is)."""
    d = cfg.distill
    timm_name = d.teacher.startswith("timm:")
    if timm_name and not d.weights:
        raise ConfigError(f"distill.weights: {d.teacher} needs a local weights file (nothing is downloaded)")
    try:
        backbone, info = load_backbone(d.teacher, d.checkpoint_key, weights=d.weights or None)
        head_sd, patch_sd = _heads(Path(d.weights if timm_name else d.teacher), d.checkpoint_key)
    except CheckpointError as err:
        raise ConfigError(f"distill.teacher: {err}") from err
    if not head_sd:
        raise _no_head(d.weights if timm_name else d.teacher)
    try:
        head = head_from_state_dict(head_sd)
        patch_head = head_from_state_dict(patch_sd) if patch_sd and cfg.ibot.separate_head else None
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"distill.teacher: {d.teacher}: its DINO head cannot be read: {err}") from err
    out_dim = head.last_layer.weight_v.shape[0]
    if out_dim != cfg.model.out_dim:
        raise ConfigError(
            f"model.out_dim: the student's head must score the teacher's {out_dim} prototypes "
            f"({d.teacher}); set model.out_dim={out_dim} (got {cfg.model.out_dim})"
        )
    _check_bands(cfg, info)
    teacher = MultiCropWrapper(backbone, head, patch_head)
    _check_patches(cfg, teacher, student)
    teacher.requires_grad_(False)
    # The backbone as trained (eval: a CNN's BatchNorm keeps its running statistics), the head as a DINO
    # teacher's runs in the release (train mode: a BatchNorm head normalises by the batch).
    teacher.train()
    teacher.backbone.eval()
    record = {"path": str(d.teacher), "weights": d.weights, "fingerprint": fingerprint(teacher),
              "arch": info["arch"], "embed_dim": info["embed_dim"]}  # fmt: skip
    return teacher, record


def _check_bands(cfg: Config, info: dict[str, Any]) -> None:
    """A teacher sees the student's inputs: as many bands, normalised by the same statistics."""
    bands = int(info.get("in_chans") or 3)
    if bands != cfg.data.channels:
        raise ConfigError(
            f"distill.teacher: {cfg.distill.teacher} takes {bands}-band images; data.channels is "
            f"{cfg.data.channels}"
        )
    stats = run_band_stats(cfg)
    mine = stats.as_dict() if stats is not None else None
    if info.get("input_stats") != mine:
        raise ConfigError(
            f"distill.teacher: {cfg.distill.teacher} was trained on inputs normalised otherwise "
            f"({info.get('input_stats') or 'ImageNet RGB'}) than data.band_stats gives "
            f"({mine or 'ImageNet RGB'})"
        )


def _check_patches(cfg: Config, teacher: MultiCropWrapper, student: MultiCropWrapper) -> None:
    """The crops must fit the teacher's patches, and iBOT compares patch by patch: the same grid."""
    for key, size in (("data.global_crops_size", cfg.data.global_crops_size),
                      ("data.local_crops_size", cfg.data.local_crops_size)):  # fmt: skip
        try:
            check_crop_size(teacher.backbone, size, key)
        except ValueError as err:
            raise ConfigError(f"distill.teacher: {err}") from err
    if not cfg.ibot.loss_weight:
        return
    try:
        teacher_patch = patch_size_of(teacher.backbone)
    except NotAViTError as err:
        raise ConfigError("ibot.loss_weight: iBOT needs the teacher's patch tokens; it is no ViT") from err
    student_patch = patch_size_of(student.backbone)
    if teacher_patch != student_patch:
        raise ConfigError(
            f"ibot.loss_weight: iBOT compares student and teacher patch by patch, and the teacher's patches "
            f"are {teacher_patch} px against the student's {student_patch}; set ibot.loss_weight=0 or use "
            "a student of the teacher's patch size"
        )
    if cfg.ibot.separate_head and not hasattr(teacher, "patch_head"):
        raise ConfigError(
            f"ibot.separate_head: {cfg.distill.teacher} has no separate patch head (patch_head.*); set "
            "ibot.separate_head=false to score patches with the teacher's DINO head"
        )


def check_resumed(record: dict[str, Any], saved: dict[str, Any] | None, path: Path) -> None:
    """A checkpoint distilled from other teacher weights is not continued from this teacher."""
    if saved is None:
        raise CheckpointError(
            f"{path} was not written by a distillation run; resuming it with distill.teacher would mix two "
            "objectives. Point train.output_dir elsewhere, or set distill.teacher='' to continue it"
        )
    if abs(saved["fingerprint"] - record["fingerprint"]) > 1e-9 * max(1.0, abs(saved["fingerprint"])):
        raise CheckpointError(
            f"{path} was distilled from {saved['path']}, whose weights differ from those of "
            f"{record['path']} now; resuming would change the teacher mid-run. Restore that file or point "
            "train.output_dir elsewhere"
        )


@torch.no_grad()
def copy_buffers_(ema: nn.Module, student: nn.Module) -> None:
    """The EMA averages parameters only; in DINO the teacher's own forward keeps its BatchNorm statistics,
    but a distilled student's EMA never runs forward, so it takes the student's (a CNN student's backbone
    would be scored with its initial statistics otherwise)."""
    for (name, b), (other, s) in zip(ema.named_buffers(), student.named_buffers(), strict=True):
        if name != other:
            raise ValueError(f"buffers differ: {name} against {other}")
        b.copy_(s)
