"""One DINO training step: forward under autocast, loss, backward, clip, freeze, optimizer step, EMA,
centering. It never logs or saves."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dino_train.core.ema import ema_update_
from dino_train.core.metrics import dino_metrics, feature_std
from dino_train.core.schedules import StepValues
from dino_train.models.wrapper import CropOutputs
from dino_train.runtime.precision import autocast
from dino_train.train.distill import copy_buffers_
from dino_train.train.gram import GramTeacher
from dino_train.train.objective import LossTerms, Objective
from dino_train.train.optim import apply_step_values, cancel_frozen_grads, clip_gradients
from dino_train.train.sharding import local_shards, reshard


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached scalars; reading them is the caller's choice (a host sync)
    parts: dict[str, torch.Tensor]  # the loss's terms (loss_dino, loss_global_global, ..., loss_ibot)
    grad_norm: torch.Tensor  # total pre-clip gradient norm of the student
    applied: bool  # False when the step was skipped for non-finite gradients
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # health telemetry, when asked for


@dataclass
class TrainModules:
    student: nn.Module  # possibly DDP-wrapped
    student_plain: nn.Module  # the same student without DDP, for parameter walks
    teacher: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    init_note: str = ""  # what model.init_weights loaded, for the run's log
    sharded: bool = False  # FSDP2 on student and teacher (train.sharding=fsdp)
    gram: GramTeacher | None = None  # Gram anchoring's frozen snapshot (gram.weight > 0)
    # distill.teacher: the frozen teacher whose outputs are the targets (``teacher`` is then the student's
    # EMA, kept for evaluation), and its record for the checkpoint.
    distill_teacher: nn.Module | None = None
    distill_record: dict | None = None
    # data.band_stats' values for a multi-band run (None for RGB): a resume must find the same ones.
    input_stats: dict | None = None

    def __post_init__(self) -> None:
        # Fixed lists, built once: the EMA and clipping walk them every step. Under FSDP the EMA lists
        # hold each rank's local shards (aliases), teacher's over student's: the EMA gathers nothing.
        named = [(n, p) for n, p in self.student_plain.named_parameters()]
        teacher_params = dict(self.teacher.named_parameters())
        self.student_params = local_shards(p for _, p in named)
        self.teacher_params = local_shards(teacher_params[n] for n, _ in named)
        self.trainable = [p for _, p in named if p.requires_grad]  # the parameters: their .grad is set
        is_backbone = [n.startswith("backbone.") for n, p in named if p.requires_grad]
        self.backbone_mask = torch.tensor(is_backbone, dtype=torch.bool)


def _forward(
    m: TrainModules,
    crops: list[torch.Tensor],
    masks: torch.Tensor | None,
    teacher_temp: float,
    s: StepSettings,
) -> tuple[LossTerms, CropOutputs, CropOutputs]:
    """One micro-batch: (loss terms, student outputs, teacher outputs)."""
    # iBOT's patch heads run on the masked positions only (the teacher's on its unmasked crops).
    patches = masks if m.objective.uses_patches else None
    gram = m.gram if m.gram is not None and m.gram.active else None
    gram_targets = None
    with autocast(s.precision, s.device):
        with torch.no_grad():
            source = m.distill_teacher if m.distill_teacher is not None else m.teacher
            teacher = source(crops[:2], patches=patches, outputs=True)  # global crops, never masked
            if m.sharded:
                reshard(m.teacher)
            if gram is not None:
                gram_targets = gram.targets(torch.cat(crops[:2]))
        student = m.student(crops, masks=patches, patches=patches, outputs=True, tokens=gram is not None)
    # The loss runs outside autocast: its softmaxes and sums over 65k prototypes need fp32.
    return m.objective(student, teacher, masks, teacher_temp, gram_targets), student, teacher


@dataclass(frozen=True)
class StepSettings:
    """What stays the same for every step of a run."""

    precision: str
    device: torch.device
    clip_grad: float = 0.0  # per-parameter norm limit; 0 disables
    freeze_last_layer: int = 0  # epochs during which the prototypes get no update
    accumulation_steps: int = 1
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: a single process
    freeze_backbone: int = 0  # epochs during which the backbone gets no update


def train_step(
    m: TrainModules,
    settings: StepSettings,
    crops: list[torch.Tensor],
    values: StepValues,
    epoch: int,
    with_metrics: bool = False,
    masks: torch.Tensor | None = None,
) -> StepOutput:
    """One optimizer step on crops [g1, g2, l1, ..., lN], each (B, 3, H, W) on the settings' device.

    With ``accumulation_steps`` = n the batch runs as n micro-batches of B / n whose gradients add up to
    the whole batch's (each micro loss is a mean, so it is scaled by 1 / n); the center and the teacher
    are updated once, after the optimizer step, from all micro-batches, exactly as one big batch would.
    ``with_metrics`` adds the health telemetry (on logging steps only: a few softmaxes over prototypes).
    ``masks`` (2B, N) bool: iBOT's masked patches of the two global crops, when its loss is on.
    """
    apply_step_values(m.optimizer, values.lr, values.weight_decay)
    m.optimizer.zero_grad(set_to_none=True)
    passes = _micro_batches(m, settings, crops, values, with_metrics, masks)
    norms, grad_norm, finite = _clip_and_check(m, settings, epoch)
    if with_metrics and norms is not None and len(norms) == len(m.backbone_mask):
        mask = m.backbone_mask.to(norms.device)
        passes.metrics["grad_norm_backbone"] = norms[mask].norm()
        passes.metrics["grad_norm_head"] = norms[~mask].norm()
    if m.scaler is not None:
        m.scaler.step(m.optimizer)  # skips by itself on inf/nan and lowers the scale
        m.scaler.update()
    elif finite:
        m.optimizer.step()
    if finite:
        ema_update_(m.teacher_params, m.student_params, values.momentum)
        if m.distill_teacher is not None:
            copy_buffers_(m.teacher, m.student_plain)
        m.objective.update(passes.teachers)
    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    return StepOutput(
        loss=mean(passes.totals),
        parts={k: mean(v) for k, v in passes.parts.items()},
        grad_norm=grad_norm.detach(),
        applied=finite,
        metrics=passes.metrics,
    )


@dataclass
class _Passes:
    """What the forward and backward passes of one step's micro-batches leave for the update."""

    teachers: list[CropOutputs] = field(default_factory=list)
    totals: list[torch.Tensor] = field(default_factory=list)
    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _micro_batches(
    m: TrainModules,
    s: StepSettings,
    crops: list[torch.Tensor],
    values: StepValues,
    with_metrics: bool,
    masks: torch.Tensor | None,
) -> _Passes:
    batch, n = crops[0].shape[0], s.accumulation_steps
    if batch % n:
        raise ValueError(f"batch {batch} is not divisible into {n} micro-batches")
    micro = batch // n
    out = _Passes()
    for i in range(n):
        part = [c[i * micro : (i + 1) * micro] for c in crops] if n > 1 else crops
        last = i == n - 1
        # DDP all-reduces gradients on the last micro-batch only.
        sync = contextlib.nullcontext() if last or not hasattr(m.student, "no_sync") else m.student.no_sync()
        with sync:
            terms, student, teacher = _forward(m, part, masks, values.teacher_temp, s)
            loss = terms.total / n
            (m.scaler.scale(loss) if m.scaler is not None else loss).backward()
        out.teachers.append(CropOutputs(teacher.logits, teacher.features, teacher.patch_logits))
        out.totals.append(terms.total.detach())
        for k, v in terms.parts.items():
            out.parts.setdefault(k, []).append(v.detach())
        if with_metrics and last:
            out.metrics = _health(m, student, teacher, values.teacher_temp)
    return out


def _health(m: TrainModules, student: CropOutputs, teacher: CropOutputs, teacher_temp: float) -> dict:
    d = m.objective.dino
    metrics = dino_metrics(student.logits.detach(), teacher.logits, d.center, teacher_temp, d.student_temp)
    metrics["student_feature_std"] = feature_std(student.features.detach())
    metrics["teacher_feature_std"] = feature_std(teacher.features)
    return metrics


def _clip_and_check(
    m: TrainModules, s: StepSettings, epoch: int
) -> tuple[torch.Tensor | None, torch.Tensor, bool]:
    """Unscale, clip per parameter, freeze the prototypes; (norms, total norm, whether finite)."""
    if m.scaler is not None:
        m.scaler.unscale_(m.optimizer)
    norms = clip_gradients(m.trainable, s.clip_grad)
    grad_norm = norms.norm() if norms is not None else torch.zeros((), device=s.device)
    # Gradients are already averaged over ranks here, so every rank takes the same decision (a rank
    # deciding alone on its own loss could skip a collective the others enter). A non-finite loss makes
    # non-finite gradients, so it is caught here too. One host sync per step.
    finite = bool(torch.isfinite(grad_norm))
    cancel_frozen_grads(m.student_plain, epoch, s.freeze_last_layer, s.freeze_backbone)
    return norms, grad_norm, finite
