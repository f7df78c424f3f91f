"""One DINO training step: forward under autocast, loss, backward, clip, freeze, optimizer step, EMA,
centering. It never logs or saves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dino_train.ema import ema_update_
from dino_train.health import dino_metrics, feature_std
from dino_train.loss import DINOLoss
from dino_train.optim import apply_step_values, cancel_last_layer_grads, clip_gradients
from dino_train.precision import autocast
from dino_train.schedules import StepValues


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
) -> StepOutput:
    """crops: [g1, g2, l1, ..., lN], each (B, 3, H, W) on ``device``. ``with_metrics`` adds the health
    telemetry (on logging steps only: it costs a few softmaxes over the prototypes)."""
    apply_step_values(m.optimizer, values.lr, values.weight_decay)
    with autocast(precision, device):
        with torch.no_grad():
            teacher_out = m.teacher(crops[:2], return_features=with_metrics)  # global crops only
        student_out = m.student(crops, return_features=with_metrics)
    if with_metrics:
        (teacher_out, teacher_feats), (student_out, student_feats) = teacher_out, student_out
    # The loss runs outside autocast: its softmaxes and sums over 65k prototypes need fp32.
    terms = m.dino_loss(student_out, teacher_out, values.teacher_temp)
    metrics: dict[str, torch.Tensor] = {}
    if with_metrics:
        metrics = dino_metrics(
            student_out.detach(),
            teacher_out,
            m.dino_loss.center,
            values.teacher_temp,
            m.dino_loss.student_temp,
        )
        metrics["student_feature_std"] = feature_std(student_feats.detach())
        metrics["teacher_feature_std"] = feature_std(teacher_feats)

    m.optimizer.zero_grad(set_to_none=True)
    if m.scaler is not None:
        m.scaler.scale(terms.total).backward()
        m.scaler.unscale_(m.optimizer)
    else:
        terms.total.backward()
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
        m.dino_loss.update_center(teacher_out, all_reduce_sum)
    return StepOutput(
        loss=terms.total.detach(),
        loss_global_global=terms.global_global.detach(),
        loss_global_local=terms.global_local.detach(),
        grad_norm=grad_norm.detach(),
        applied=finite,
        metrics=metrics,
    )
