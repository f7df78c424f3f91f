"""One DINO training step: forward under autocast, loss, backward, clip, freeze, optimizer step, EMA,
centering. It never logs or saves."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dino_train.core.ema import ema_update_
from dino_train.core.loss import DINOLoss, DinoLossTerms
from dino_train.core.metrics import dino_metrics, feature_std
from dino_train.core.schedules import StepValues
from dino_train.runtime.precision import autocast
from dino_train.train.optim import apply_step_values, cancel_last_layer_grads, clip_gradients


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached scalars; reading them is the caller's choice (a host sync)
    loss_global_global: torch.Tensor
    loss_global_local: torch.Tensor
    grad_norm: torch.Tensor  # total pre-clip gradient norm of the student
    applied: bool  # False when the step was skipped for non-finite gradients
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # health telemetry, when asked for


@dataclass
class TrainModules:
    student: nn.Module  # possibly DDP-wrapped
    student_plain: nn.Module  # the same student without DDP, for parameter walks
    teacher: nn.Module
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None

    def __post_init__(self) -> None:
        # Fixed lists, built once: the EMA and clipping walk them every step.
        named = [(n, p) for n, p in self.student_plain.named_parameters()]
        teacher_params = dict(self.teacher.named_parameters())
        self.student_params = [p for _, p in named]
        self.teacher_params = [teacher_params[n] for n, _ in named]
        self.trainable = [p for p in self.student_params if p.requires_grad]
        is_backbone = [n.startswith("backbone.") for n, p in named if p.requires_grad]
        self.backbone_mask = torch.tensor(is_backbone, dtype=torch.bool)


def _forward(
    m: TrainModules,
    crops: list[torch.Tensor],
    teacher_temp: float,
    precision: str,
    device: torch.device,
    with_features: bool,
) -> tuple[DinoLossTerms, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One micro-batch: (loss terms, student logits, teacher logits, student and teacher features)."""
    with autocast(precision, device):
        with torch.no_grad():
            teacher_out = m.teacher(crops[:2], return_features=with_features)  # global crops only
        student_out = m.student(crops, return_features=with_features)
    s_feats = t_feats = None
    if with_features:
        (teacher_out, t_feats), (student_out, s_feats) = teacher_out, student_out
    # The loss runs outside autocast: its softmaxes and sums over 65k prototypes need fp32.
    return m.dino_loss(student_out, teacher_out, teacher_temp), student_out, teacher_out, s_feats, t_feats


def train_step(
    m: TrainModules,
    crops: list[torch.Tensor],
    values: StepValues,
    epoch: int,
    *,
    precision: str,
    device: torch.device,
    clip_grad: float,
    freeze_last_layer: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    with_metrics: bool = False,
    accumulation_steps: int = 1,
) -> StepOutput:
    """One optimizer step on crops [g1, g2, l1, ..., lN], each (B, 3, H, W) on ``device``.

    With ``accumulation_steps`` = n the batch runs as n micro-batches of B / n whose gradients add up to
    the whole batch's (each micro loss is a mean, so it is scaled by 1 / n); the center and the teacher
    are updated once, after the optimizer step, from all micro-batches, exactly as one big batch would.
    ``with_metrics`` adds the health telemetry (on logging steps only: a few softmaxes over prototypes).
    """
    apply_step_values(m.optimizer, values.lr, values.weight_decay)
    m.optimizer.zero_grad(set_to_none=True)
    batch = crops[0].shape[0]
    if batch % accumulation_steps:
        raise ValueError(f"batch {batch} is not divisible into {accumulation_steps} micro-batches")
    micro = batch // accumulation_steps
    teacher_outs, totals, gg, gl = [], [], [], []
    metrics: dict[str, torch.Tensor] = {}
    for i in range(accumulation_steps):
        part = [c[i * micro : (i + 1) * micro] for c in crops] if accumulation_steps > 1 else crops
        last = i == accumulation_steps - 1
        # DDP all-reduces gradients on the last micro-batch only.
        sync = contextlib.nullcontext() if last or not hasattr(m.student, "no_sync") else m.student.no_sync()
        with sync:
            terms, student_out, teacher_out, s_feats, t_feats = _forward(
                m, part, values.teacher_temp, precision, device, with_metrics and last
            )
            loss = terms.total / accumulation_steps
            (m.scaler.scale(loss) if m.scaler is not None else loss).backward()
        teacher_outs.append(teacher_out)
        totals.append(terms.total.detach())
        gg.append(terms.global_global.detach())
        gl.append(terms.global_local.detach())
        if with_metrics and last:
            metrics = dino_metrics(
                student_out.detach(),
                teacher_out,
                m.dino_loss.center,
                values.teacher_temp,
                m.dino_loss.student_temp,
            )
            metrics["student_feature_std"] = feature_std(s_feats.detach())
            metrics["teacher_feature_std"] = feature_std(t_feats)

    if m.scaler is not None:
        m.scaler.unscale_(m.optimizer)
    norms = clip_gradients(m.trainable, clip_grad)
    grad_norm = norms.norm() if norms is not None else torch.zeros((), device=device)
    if with_metrics and norms is not None and len(norms) == len(m.backbone_mask):
        mask = m.backbone_mask.to(norms.device)
        metrics["grad_norm_backbone"] = norms[mask].norm()
        metrics["grad_norm_head"] = norms[~mask].norm()
    # Gradients are already averaged over ranks here, so every rank takes the same decision (a rank
    # deciding alone on its own loss could skip a collective the others enter). A non-finite loss makes
    # non-finite gradients, so it is caught here too. One host sync per step.
    finite = bool(torch.isfinite(grad_norm))
    cancel_last_layer_grads(m.student_plain, epoch, freeze_last_layer)

    if m.scaler is not None:
        m.scaler.step(m.optimizer)  # skips by itself on inf/nan and lowers the scale
        m.scaler.update()
    elif finite:
        m.optimizer.step()
    if finite:
        ema_update_(m.teacher_params, m.student_params, values.momentum)
        m.dino_loss.update_center(torch.cat(teacher_outs), all_reduce_sum)
    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    return StepOutput(
        loss=mean(totals),
        loss_global_global=mean(gg),
        loss_global_local=mean(gl),
        grad_norm=grad_norm.detach(),
        applied=finite,
        metrics=metrics,
    )
