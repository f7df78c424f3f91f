"""train(cfg): build everything, resume, loop over epochs, log and checkpoint. Runs the same under a
single process, torchrun and Slurm."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dino_train.config import PRECISIONS, Config, save_config
from dino_train.monitor.attention_log import fixed_images, log_attention_to_tensorboard
from dino_train.monitor.health import CollapseDetector
from dino_train.monitor.logger import Monitor, log_scalars, step_scalars
from dino_train.monitor.periodic import PeriodicKNN
from dino_train.runtime import distributed as D
from dino_train.runtime.precision import resolve_precision
from dino_train.runtime.signals import StopSignals
from dino_train.train.build import build_loader, build_modules, build_run_schedules
from dino_train.train.checkpoint import BACKBONE_EXPORT, CheckpointManager, export_backbone
from dino_train.train.state import checkpoint_state, restore, resume_point
from dino_train.train.step import train_step


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


class PeerError(RuntimeError):
    """Another process of the run died or stopped answering."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    epoch: int
    teacher: nn.Module
    student: nn.Module
    center: torch.Tensor
    last_loss: float | None
    stopped_by: str | None = None  # the signal's name when a stop request ended the run early
    warnings: list[str] = field(default_factory=list)  # health warnings raised during the run


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the model's own randomness (drop path) at one step: a resumed run draws the same."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % (2**63)


def train(cfg: Config) -> TrainResult:
    env = D.detect_env()
    device = D.resolve_device(cfg.train.device, env.local_rank)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)  # first: auto precision measures with these threads
    # May reject fp16 on CPU: before any compute.
    precision, precision_note = resolve_precision(cfg.train.precision, device)
    D.init_distributed(env, device, cfg.train.dist_timeout_s)
    if cfg.train.precision == "auto" and D.is_distributed():
        # Ranks measure their own matmul speed; they must still train alike, so rank 0's choice holds.
        choice = torch.tensor([PRECISIONS.index(precision)], device=device)
        precision = PRECISIONS[int(D.broadcast_from_main(choice).item())]
    stop = StopSignals()
    try:
        with stop:
            result = _train(cfg, env, device, precision, precision_note, stop)
    except RuntimeError as err:
        if env.world_size == 1 or not _is_peer_failure(err):
            raise
        raise PeerError(
            f"rank {env.rank}: a collective with the other {env.world_size - 1} process(es) failed or timed"
            f" out after train.dist_timeout_s={cfg.train.dist_timeout_s:g} s; another rank died or hangs. "
            f"The last complete checkpoint in {cfg.train.output_dir} is intact. ({type(err).__name__}: {err})"
        ) from err
    finally:
        D.cleanup()
    if result.stopped_by is not None:
        stop.hand_on()  # e.g. submitit's handler, which requeues the job
    return result


def _is_peer_failure(err: RuntimeError) -> bool:
    """gloo and NCCL report a dead or silent peer as plain RuntimeErrors (or DistErrors) with these words."""
    words = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "peer")
    return isinstance(err, torch.distributed.DistError) or any(w in str(err).lower() for w in words)


def _stop_requested(stop: StopSignals, world_size: int, device: torch.device) -> bool:
    """Whether any rank got a stop signal; every rank must agree so they all stop at the same step."""
    flag = stop.received is not None
    if world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    return bool(D.all_reduce_sum(t).item() > 0)


def _train(
    cfg: Config,
    env: D.DistEnv,
    device: torch.device,
    precision: str,
    precision_note: str,
    stop: StopSignals,
) -> TrainResult:
    out = Path(cfg.train.output_dir)
    d = cfg.data
    loader, sampler = build_loader(cfg, env, device)
    spe = sampler.batches_per_epoch
    mods = build_modules(cfg, env, device, precision)
    sched = build_run_schedules(cfg, env.world_size, spe)
    knn = PeriodicKNN(cfg.monitor, d.global_crops_size, device) if cfg.monitor.knn_data else None
    attention_images = None
    if cfg.monitor.attention_images and env.is_main:
        attention_images = fixed_images(cfg.monitor.attention_images, d.global_crops_size)

    manager = CheckpointManager(out, cfg.train.keep_last)
    step, start_epoch, start_batch = 0, 0, 0
    notes = []
    loaded = manager.load_latest(map_location=device) if cfg.train.resume else None
    if loaded is not None:
        state, path = loaded
        restore(mods, state, path)
        step, start_epoch, start_batch, notes = resume_point(
            state, path, spe, d.batch_size_per_gpu, env.world_size
        )

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
    if precision_note:
        monitor.message(f"train.precision {precision}: {precision_note}")
    for note in notes:
        monitor.message(note)

    def save(epoch: int, batch: int, keep_epoch: int | None = None) -> None:
        if env.is_main:
            manager.save(
                checkpoint_state(mods, cfg, env.world_size, epoch, batch, step, spe), step, keep_epoch
            )
            export_backbone(mods.teacher.backbone, out / BACKBONE_EXPORT)

    last_loss = None
    detector = CollapseDetector()
    warnings_raised: list[str] = []
    stopped_by = None
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
            log_now = (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == total_steps
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
                with_metrics=log_now,
                accumulation_steps=cfg.train.accumulation_steps,
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
            if log_now:
                scalars = step_scalars(res, values, t_data, t_step, d.batch_size_per_gpu * env.world_size)
                last_loss = scalars["loss"]
                log_scalars(monitor, step, epoch, scalars)
                for warning in detector.check(scalars, step):
                    warnings_raised.append(warning)
                    monitor.warn(warning)
            monitor.advance(1)
            epoch_done = batch + 1 == spe
            finished = step >= total_steps
            every = cfg.train.checkpoint_every_steps
            if _stop_requested(stop, env.world_size, device):
                stopped_by = (
                    signal.Signals(stop.received).name if stop.received else "a signal to another rank"
                )
                finished = True
            if not epoch_done and (finished or (every and step % every == 0)):
                save(epoch, batch + 1)
            if finished:
                break
        if skipped_files:
            monitor.message(f"epoch {epoch}: skipped {skipped_files} unreadable image(s) on rank {env.rank}")
        if env.is_main:
            monitor.record("epoch", step, {"epoch": epoch, "skipped_files": skipped_files})
            monitor.scalars(step, {"skipped_files": skipped_files})
        if knn is not None and epoch_done and (epoch + 1) % cfg.monitor.knn_every_epochs == 0:
            accuracy = knn.evaluate(mods.teacher.backbone)
            top1 = {f"knn_top1_k{k}": a[0] for k, a in accuracy.items()}
            monitor.scalars(step, top1, prefix="knn")
            monitor.record(
                "knn", step, {"epoch": epoch, **top1, **{f"knn_top5_k{k}": a[1] for k, a in accuracy.items()}}
            )
            monitor.message(
                f"epoch {epoch}: k-NN top-1 " + ", ".join(f"k={k}: {a[0]:.1f}%" for k, a in accuracy.items())
            )
        if (
            attention_images is not None
            and epoch_done
            and (epoch + 1) % cfg.monitor.attention_every_epochs == 0
        ):
            log_attention_to_tensorboard(monitor.writer, mods.teacher.backbone, attention_images, step)
        if epoch_done:
            keep = epoch + 1 if cfg.train.saveckp_freq and (epoch + 1) % cfg.train.saveckp_freq == 0 else None
            save(epoch + 1, 0, keep)
        epoch += 1
    D.barrier()
    if stopped_by is not None:
        monitor.message(f"stopped by {stopped_by} at step {step}: checkpoint written; run again to resume")
    monitor.message(
        f"done at step {step}: checkpoints in {out}, teacher backbone in {out / BACKBONE_EXPORT}, "
        f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}"
    )
    monitor.close()
    return TrainResult(
        out,
        step,
        epoch,
        mods.teacher,
        mods.student_plain,
        mods.dino_loss.center.clone(),
        last_loss,
        stopped_by,
        warnings_raised,
    )
