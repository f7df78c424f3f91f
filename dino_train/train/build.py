"""Build a run's parts from its config: data loader, student/teacher and optimizer, schedules."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dino_train.config import Config, scaled_lr
from dino_train.core.loss import DINOLoss
from dino_train.core.schedules import Schedules, build_schedules
from dino_train.data import MultiCropAugmentation, ResumableSampler, build_pretrain_loader
from dino_train.models import build_student_teacher
from dino_train.runtime.distributed import DistEnv
from dino_train.runtime.precision import make_scaler
from dino_train.train.optim import build_optimizer
from dino_train.train.step import TrainModules


def build_loader(cfg: Config, env: DistEnv, device: torch.device) -> tuple[DataLoader, ResumableSampler]:
    d = cfg.data
    transform = MultiCropAugmentation(
        d.global_crops_size,
        d.global_crops_scale,
        d.local_crops_number,
        d.local_crops_size,
        d.local_crops_scale,
    )
    return build_pretrain_loader(
        d.path,
        transform,
        d.batch_size_per_gpu,
        d.num_workers,
        cfg.train.seed,
        env.rank,
        env.world_size,
        pin_memory=device.type == "cuda",
    )


def build_modules(cfg: Config, env: DistEnv, device: torch.device, precision: str) -> TrainModules:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    m = cfg.model
    student, teacher = build_student_teacher(
        m.arch,
        m.patch_size,
        m.img_size or cfg.data.global_crops_size,
        m.drop_path_rate,
        m.out_dim,
        use_bn_in_head=m.use_bn_in_head,
        norm_last_layer=m.norm_last_layer,
        head_nlayers=m.head_nlayers,
        head_hidden_dim=m.head_hidden_dim,
        head_bottleneck_dim=m.head_bottleneck_dim,
    )
    if m.use_bn_in_head and device.type == "cuda" and env.world_size > 1:
        # SyncBatchNorm refuses CPU modules, so it is only used on GPUs.
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(device), teacher.to(device)
    fused = cfg.train.fused_attention == "fused" or (
        cfg.train.fused_attention == "auto" and device.type == "cuda"
    )
    for model in (student, teacher):
        for block in model.backbone.blocks:
            block.attn.fused_attn = fused
    if cfg.train.grad_checkpointing:
        # Only the student trains; the teacher runs under no_grad and keeps no activations anyway.
        student.backbone.set_grad_checkpointing(True)
    if cfg.train.compile:
        # In place (Module.compile), so the state dict keeps its names: checkpoints stay the release's.
        student.backbone.compile()
        teacher.backbone.compile()
    wrapped: nn.Module = student
    if env.world_size > 1:
        wrapped = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    n_crops = 2 + cfg.data.local_crops_number
    return TrainModules(
        student=wrapped,
        student_plain=student,
        teacher=teacher,
        dino_loss=DINOLoss(m.out_dim, n_crops, cfg.dino.student_temp, cfg.dino.center_momentum).to(device),
        optimizer=build_optimizer(student, cfg.optim.optimizer),
        scaler=make_scaler(precision, device),
    )


def build_run_schedules(cfg: Config, world_size: int, steps_per_epoch: int) -> Schedules:
    return build_schedules(
        base_lr=scaled_lr(cfg.optim.lr, cfg.data.batch_size_per_gpu, world_size),
        min_lr=cfg.optim.min_lr,
        warmup_epochs=cfg.optim.warmup_epochs,
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=cfg.optim.weight_decay_end,
        momentum_teacher=cfg.dino.momentum_teacher,
        warmup_teacher_temp=cfg.dino.warmup_teacher_temp,
        teacher_temp=cfg.dino.teacher_temp,
        warmup_teacher_temp_epochs=cfg.dino.warmup_teacher_temp_epochs,
        teacher_temp_per_step=cfg.dino.teacher_temp_schedule == "step",
        epochs=cfg.train.epochs,
        steps_per_epoch=steps_per_epoch,
    )
