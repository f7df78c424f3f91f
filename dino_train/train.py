"""train(cfg): build everything, resume, loop over epochs, log and checkpoint. Runs the same under a
single process, torchrun and Slurm."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dino_train import distributed as D
from dino_train.checkpoint import (
    BACKBONE_EXPORT,
    CheckpointError,
    CheckpointManager,
    export_backbone,
    strip_prefix,
    with_prefix,
)
from dino_train.config import Config, save_config, scaled_lr, to_dict
from dino_train.data import MultiCropAugmentation, build_pretrain_loader
from dino_train.engine import StepOutput, TrainModules, train_step
from dino_train.loss import DINOLoss
from dino_train.models import build_student_teacher
from dino_train.monitoring import Monitor
from dino_train.optim import build_optimizer
from dino_train.precision import make_scaler, resolve_precision
from dino_train.schedules import build_schedules


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    epoch: int
    teacher: nn.Module
    student: nn.Module
    center: torch.Tensor
    last_loss: float | None


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the model's own randomness (drop path) at one step: a resumed run draws the same."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % (2**63)


def train(cfg: Config) -> TrainResult:
    env = D.detect_env()
    device = D.resolve_device(cfg.train.device, env.local_rank)
    precision = resolve_precision(cfg.train.precision, device)  # may reject fp16 on CPU: before any compute
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    D.init_distributed(env, device)
    try:
        return _train(cfg, env, device, precision)
    finally:
        D.cleanup()


def build_modules(cfg: Config, env: D.DistEnv, device: torch.device, precision: str) -> TrainModules:
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


def _checkpoint_state(
    mods: TrainModules, cfg: Config, env: D.DistEnv, epoch: int, batch: int, step: int, spe: int
) -> dict:
    state = {
        "student": with_prefix(mods.student_plain.state_dict(), "module."),
        "teacher": mods.teacher.state_dict(),
        "optimizer": mods.optimizer.state_dict(),
        "epoch": epoch,  # the epoch to run next (the one in progress when batch_in_epoch > 0)
        "batch_in_epoch": batch,
        "step": step,
        "steps_per_epoch": spe,
        "world_size": env.world_size,
        "samples_seen": step * cfg.data.batch_size_per_gpu * env.world_size,
        "dino_loss": mods.dino_loss.state_dict(),
        "config": to_dict(cfg),
        "format_version": 1,
    }
    if mods.scaler is not None:
        state["fp16_scaler"] = mods.scaler.state_dict()
    return state


def _restore(mods: TrainModules, state: dict, path: Path) -> None:
    try:
        mods.student_plain.load_state_dict(strip_prefix(state["student"], "module."))
        mods.teacher.load_state_dict(state["teacher"])
        mods.dino_loss.load_state_dict(state["dino_loss"])
        mods.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path} does not fit the model of this config (another architecture or out_dim?): {err}\n"
            "Nothing was overwritten; point train.output_dir elsewhere or fix the config."
        ) from err
    if mods.scaler is not None and "fp16_scaler" in state:
        mods.scaler.load_state_dict(state["fp16_scaler"])


def _train(cfg: Config, env: D.DistEnv, device: torch.device, precision: str) -> TrainResult:
    out = Path(cfg.train.output_dir)
    d = cfg.data
    transform = MultiCropAugmentation(
        d.global_crops_size,
        d.global_crops_scale,
        d.local_crops_number,
        d.local_crops_size,
        d.local_crops_scale,
    )
    loader, sampler = build_pretrain_loader(
        d.path,
        transform,
        d.batch_size_per_gpu,
        d.num_workers,
        cfg.train.seed,
        env.rank,
        env.world_size,
        pin_memory=device.type == "cuda",
    )
    spe = sampler.batches_per_epoch
    mods = build_modules(cfg, env, device, precision)
    sched = build_schedules(
        base_lr=scaled_lr(cfg.optim.lr, d.batch_size_per_gpu, env.world_size),
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
        steps_per_epoch=spe,
    )

    manager = CheckpointManager(out, cfg.train.keep_last)
    step, start_epoch, start_batch = 0, 0, 0
    notes = []
    loaded = manager.load_latest(map_location=device) if cfg.train.resume else None
    if loaded is not None:
        state, path = loaded
        _restore(mods, state, path)
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        if state.get("steps_per_epoch") != spe:
            # Another world size or batch: continue the schedules by the number of samples seen.
            step = round(state["samples_seen"] / (d.batch_size_per_gpu * env.world_size))
            start_epoch, start_batch = divmod(step, spe)
            notes.append(
                f"steps per epoch changed ({state.get('steps_per_epoch')} -> {spe}, world size "
                f"{state.get('world_size')} -> {env.world_size}); "
                f"schedules continue by samples seen, at step {step}"
            )
        notes.insert(0, f"resumed from {path} at epoch {start_epoch}, batch {start_batch}, step {step}")

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    total_steps = cfg.train.epochs * spe
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    monitor = Monitor(out, env.is_main, total_steps, min(step, total_steps), cfg.train.progress_bar)
    if env.is_main:
        monitor.text("config", "```yaml\n" + (out / "config.yaml").read_text() + "\n```")
    monitor.message(
        f"DINO {cfg.model.arch}/{cfg.model.patch_size} on {device} ({precision}), "
        f"{env.world_size} process(es), "
        f"{spe * d.batch_size_per_gpu * env.world_size} images/epoch, "
        f"{spe} steps/epoch, {cfg.train.epochs} epochs -> {out}"
    )
    for note in notes:
        monitor.message(note)

    def save(epoch: int, batch: int, keep_epoch: int | None = None) -> None:
        if env.is_main:
            manager.save(_checkpoint_state(mods, cfg, env, epoch, batch, step, spe), step, keep_epoch)
            export_backbone(mods.teacher.backbone, out / BACKBONE_EXPORT)

    last_loss = None
    bad_in_a_row = 0
    finished = step >= total_steps
    epoch = start_epoch
    while not finished and epoch < cfg.train.epochs:
        sampler.set_epoch(epoch)
        first = start_batch if epoch == start_epoch else 0
        sampler.set_start_batch(first)
        t_prev = time.perf_counter()
        epoch_done = False
        skipped_files = 0
        for batch, (crops, _labels, skipped) in enumerate(loader, start=first):
            skipped_files += skipped
            t_data = time.perf_counter() - t_prev
            crops = [c.to(device, non_blocking=True) for c in crops]
            torch.manual_seed(step_seed(cfg.train.seed, env.rank, step))
            values = sched.at(step)
            res = train_step(
                mods,
                crops,
                values,
                epoch,
                precision=precision,
                device=device,
                clip_grad=cfg.optim.clip_grad,
                freeze_last_layer=cfg.optim.freeze_last_layer,
                all_reduce_sum=D.all_reduce_sum,
            )
            step += 1
            bad_in_a_row = 0 if res.applied else bad_in_a_row + 1
            if not res.applied:
                monitor.message(f"step {step}: non-finite gradients, step skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= cfg.train.max_nonfinite_steps:
                    last = manager.numbered()[-1][1] if manager.numbered() else "none yet"
                    raise NonFiniteError(
                        f"{bad_in_a_row} consecutive non-finite steps up to step {step} (epoch {epoch}); "
                        f"last good checkpoint: {last} (left intact). Try a lower optim.lr, "
                        "train.precision=bf16 or fp32, or a larger dino.warmup_teacher_temp_epochs."
                    )
            t_step = time.perf_counter() - t_prev
            t_prev = time.perf_counter()
            if step % cfg.train.log_every_steps == 0 or step == total_steps:
                last_loss = _log(
                    monitor, res, values, step, epoch, t_data, t_step, d.batch_size_per_gpu * env.world_size
                )
            monitor.advance(1)
            epoch_done = batch + 1 == spe
            finished = step >= total_steps
            every = cfg.train.checkpoint_every_steps
            if not epoch_done and (finished or (every and step % every == 0)):
                save(epoch, batch + 1)
            if finished:
                break
        if skipped_files:
            monitor.message(f"epoch {epoch}: skipped {skipped_files} unreadable image(s) on rank {env.rank}")
        if env.is_main:
            monitor.record("epoch", step, {"epoch": epoch, "skipped_files": skipped_files})
            monitor.scalars(step, {"skipped_files": skipped_files})
        if epoch_done:
            keep = epoch + 1 if cfg.train.saveckp_freq and (epoch + 1) % cfg.train.saveckp_freq == 0 else None
            save(epoch + 1, 0, keep)
        epoch += 1
    D.barrier()
    monitor.message(
        f"done at step {step}: checkpoints in {out}, teacher backbone in {out / BACKBONE_EXPORT}, "
        f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}"
    )
    monitor.close()
    return TrainResult(
        out, step, epoch, mods.teacher, mods.student_plain, mods.dino_loss.center.clone(), last_loss
    )


def _log(
    monitor: Monitor,
    res: StepOutput,
    values,
    step: int,
    epoch: int,
    t_data: float,
    t_step: float,
    total_batch: int,
) -> float:
    loss = res.loss.item()
    scalars = {
        "loss": loss,
        "loss_global_global": res.loss_global_global.item(),
        "loss_global_local": res.loss_global_local.item(),
        "lr": values.lr,
        "weight_decay": values.weight_decay,
        "momentum": values.momentum,
        "teacher_temp": values.teacher_temp,
        "grad_norm": res.grad_norm.item(),
        "images_per_s": total_batch / max(t_step, 1e-9),
        "step_time_s": t_step,
        "data_time_s": t_data,
    }
    monitor.scalars(step, scalars)
    monitor.record(
        "step", step, {"epoch": epoch, **{k: (v if math.isfinite(v) else None) for k, v in scalars.items()}}
    )
    monitor.advance(0, {"loss": f"{loss:.4f}", "img/s": f"{scalars['images_per_s']:.1f}", "ep": str(epoch)})
    return loss
