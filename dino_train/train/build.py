"""A run's parts from its config: the data loader, student and teacher with their loss and optimizer, and
the schedules. Each builder takes the sections it needs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dino_train.config import Config, DataConfig, RunPlan, position_grid_size
from dino_train.config.fields import ConfigError
from dino_train.core.schedules import Schedules, cosine_schedule, teacher_temp_schedule
from dino_train.data import (
    MultiCropAugmentation,
    ResumableSampler,
    TensorMultiCrop,
    build_pretrain_loader,
    build_tensor_pretrain_loader,
    resolve_augment_device,
)
from dino_train.data.band_augment import BandMultiCrop
from dino_train.data.bands import BandDataset, BandStats
from dino_train.data.shards import build_shard_loader
from dino_train.models import build_student_teacher
from dino_train.models.backbone import check_crop_size
from dino_train.runtime import distributed as D
from dino_train.runtime.distributed import DistEnv
from dino_train.runtime.precision import make_scaler
from dino_train.train.distill import load_teacher
from dino_train.train.gram import GramTeacher
from dino_train.train.init_weights import init_from_file
from dino_train.train.objective import Objective
from dino_train.train.optim import build_optimizer
from dino_train.train.sharding import check_fsdp, shard_model
from dino_train.train.spec import run_spec
from dino_train.train.step import TrainModules


def build_loader(
    d: DataConfig, seed: int, env: DistEnv, device: torch.device, stats: BandStats | None = None
) -> tuple[DataLoader, ResumableSampler]:
    """The multi-crop loader on the path ``data.augment_device`` names for a run training on ``device``
    (with ``cuda`` its batches hold RawCrops: finish them with ``data.crops_to_device``); with ``stats``
    (``spec.run_band_stats``), the multi-band loader of ``data.band_augment``."""
    try:
        mode = resolve_augment_device(d.augment_device, device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    crops = (d.global_crops_size, d.global_crops_scale, d.local_crops_number, d.local_crops_size,
             d.local_crops_scale, d.solarize_p, d.solarize_threshold)  # fmt: skip
    rest = (d.batch_size_per_gpu, d.num_workers, seed, env.rank, env.world_size, device.type == "cuda")
    if stats is not None:  # N-band files: read, cropped and jittered per band in the loader
        augment = BandMultiCrop(stats, *crops[:6])
        base = BandDataset(d.path, d.channels)
        return build_pretrain_loader(d.path, augment, *rest, base=base)
    if d.format == "shards":  # a ShardStream plays the sampler's part (set_epoch, set_start_batch)
        return build_shard_loader(d.path, mode, crops, *rest, shuffle_buffer=d.shuffle_buffer)
    if mode == "pil":
        return build_pretrain_loader(d.path, MultiCropAugmentation(*crops), *rest)
    return build_tensor_pretrain_loader(d.path, TensorMultiCrop(*crops), *rest, on_device=mode == "cuda")


def _set_attention(model: nn.Module, mode: str, device: torch.device) -> None:
    """Fused scaled_dot_product_attention or the explicit softmax in every ViT block (others have none)."""
    fused = mode == "fused" or (mode == "auto" and device.type == "cuda")
    for block in getattr(model.backbone, "blocks", []):
        if hasattr(getattr(block, "attn", None), "fused_attn"):
            block.attn.fused_attn = fused


def _check_crops(cfg: Config, student: nn.Module) -> None:
    for key, size in (
        ("data.global_crops_size", cfg.data.global_crops_size),
        ("data.local_crops_size", cfg.data.local_crops_size),
    ):
        try:
            check_crop_size(student.backbone, size, key)
        except ValueError as err:
            raise ConfigError(str(err)) from err


def build_modules(cfg: Config, env: DistEnv, device: torch.device, precision: str) -> TrainModules:
    """Student (DDP-wrapped with several processes), teacher, objective, optimizer and scaler; the
    ``init_note`` of the result says what ``model.init_weights`` loaded."""
    note = ""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    m, t = cfg.model, cfg.train
    student, teacher = build_student_teacher(m, position_grid_size(cfg), cfg.ibot, cfg.data.channels)
    if m.init_weights:
        note = init_from_file(student, m.init_weights, m.init_strict, m.init_head)
        teacher.load_state_dict(student.state_dict())  # the teacher starts equal to the student
    _check_crops(cfg, student)
    # Before any other compute: a teacher that does not fit is a ConfigError.
    distilled, record = load_teacher(cfg, student) if cfg.distill.teacher else (None, None)
    has_bn = any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in student.modules())
    if has_bn and device.type == "cuda" and env.world_size > 1:
        # SyncBatchNorm refuses CPU modules, so it is only used on GPUs.
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(device), teacher.to(device)
    distilled = distilled.to(device) if distilled is not None else None
    for model in (student, teacher, distilled):
        if model is not None:
            _set_attention(model, t.fused_attention, device)
    if t.grad_checkpointing:
        # Only the student trains; the teacher runs under no_grad and keeps no activations anyway.
        student.backbone.set_grad_checkpointing(True)
    if t.compile:
        # In place (Module.compile), so the state dict keeps its names: checkpoints stay the release's.
        student.backbone.compile()
        teacher.backbone.compile()
    wrapped: nn.Module = student
    sharded = t.sharding == "fsdp" and env.world_size > 1  # one process trains unsharded
    if t.sharding == "fsdp":
        check_fsdp(cfg, precision)
    if sharded:  # in place: student and teacher keep their classes' forward and parameter names
        shard_model(student, precision)
        shard_model(teacher, precision)
    elif env.world_size > 1:
        wrapped = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    mods = TrainModules(
        student=wrapped,
        student_plain=student,
        teacher=teacher,
        objective=Objective(cfg, D.all_reduce_sum).to(device),
        optimizer=build_optimizer(student, cfg.optim.optimizer),
        scaler=make_scaler(precision, device),
        sharded=sharded,
    )
    mods.init_note = note
    mods.distill_teacher, mods.distill_record = distilled, record
    mods.input_stats = run_spec(cfg).input_stats
    if cfg.gram.weight:  # after the teacher is on its device (and initialised from a file, if asked)
        mods.gram = GramTeacher(cfg.gram, teacher.backbone)
    return mods


def build_run_schedules(cfg: Config, plan: RunPlan) -> Schedules:
    """DINO's four per-step schedules: cosine lr after a linear warmup (peak = the scaled lr), cosine
    weight decay, cosine teacher momentum to 1, and the teacher temperature's warmup."""
    o, k, epochs, spe = cfg.optim, cfg.dino, cfg.train.epochs, plan.steps_per_epoch
    return Schedules(
        lr=cosine_schedule(plan.base_lr, o.min_lr, epochs, spe, o.warmup_epochs),
        weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, spe),
        momentum=cosine_schedule(k.momentum_teacher, 1.0, epochs, spe),
        teacher_temp=teacher_temp_schedule(
            k.warmup_teacher_temp,
            k.teacher_temp,
            k.warmup_teacher_temp_epochs,
            epochs,
            spe,
            per_step=k.teacher_temp_schedule == "step",
        ),
    )
