"""train(cfg): set up the process, build the run's state (resuming it if a checkpoint exists), and run a
step-indexed loop whose hooks log, watch health, checkpoint and evaluate. Runs the same under a single
process, torchrun and Slurm."""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dino_train.config import Config, Precision, plan_run, save_config
from dino_train.data.bands import save_band_stats
from dino_train.data.photometric import crops_to_device
from dino_train.data.sampler import mix_seed
from dino_train.models.backbone import patch_size_of
from dino_train.models.masking import sample_masks
from dino_train.monitor.health import CollapseDetector
from dino_train.monitor.logger import Monitor
from dino_train.monitor.periodic import AttentionImages, PeriodicJaccard, PeriodicKNN
from dino_train.runtime import distributed as D
from dino_train.runtime.device import pick_device
from dino_train.runtime.files import check_writable_dir
from dino_train.runtime.precision import resolve_precision
from dino_train.runtime.signals import StopSignals
from dino_train.train.build import build_loader, build_modules, build_run_schedules
from dino_train.train.checkpoint import BACKBONE_EXPORT, CheckpointManager
from dino_train.train.hooks import (
    Checkpoints,
    EpochLog,
    Health,
    Hook,
    NonFiniteError,
    NonFiniteGuard,
    StepEvent,
    StepLog,
    StopVote,
)
from dino_train.train.sharded_checkpoint import ShardedCheckpoints
from dino_train.train.spec import run_band_stats
from dino_train.train.state import RunContext, TrainState, resume
from dino_train.train.step import StepSettings, train_step

__all__ = ["NonFiniteError", "PeerError", "TrainResult", "train"]


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

    def __repr__(self) -> str:
        # Short: the models are in .teacher and .student; printing them whole buries the result.
        loss = "-" if self.last_loss is None else f"{self.last_loss:.4f}"
        stop = f", stopped_by={self.stopped_by}" if self.stopped_by else ""
        return (
            f"TrainResult(output_dir={str(self.output_dir)!r}, step={self.step}, epoch={self.epoch}, "
            f"last_loss={loss}, warnings={len(self.warnings)}{stop})"
        )


def _context(cfg: Config) -> tuple[RunContext, str]:
    """This process's place in the launch, its device and precision (with why ``auto`` chose it)."""
    env = D.detect_env()
    device = pick_device(cfg.train.device, env.local_rank)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)  # first: auto precision measures with these threads
    precision, note = resolve_precision(cfg.train.precision, device)  # may refuse fp16 on CPU: no compute yet
    D.init_distributed(env, device, cfg.train.dist_timeout_s)
    if cfg.train.precision == "auto" and D.is_distributed():
        # Ranks measure their own matmul speed; they must still train alike, so rank 0's choice holds.
        names = typing.get_args(Precision)
        choice = torch.tensor([names.index(precision)], device=device)
        precision = names[int(D.broadcast_from_main(choice).item())]
    return RunContext(env, device, precision), note


def train(cfg: Config) -> TrainResult:
    ctx, note = _context(cfg)
    stop = StopSignals()
    try:
        with stop:
            result = Run(cfg, ctx, stop).run(note)
        # Tear the group down together: a rank that destroyed it while another was still writing its last
        # checkpoint once aborted at exit ("terminate called without an active exception"). Only on the
        # way out of a run that ended well: after a failure the peers may be gone, and a barrier would hang.
        D.barrier()
    except RuntimeError as err:
        if ctx.env.world_size == 1 or not _is_peer_failure(err):
            raise
        raise PeerError(
            f"rank {ctx.env.rank}: a collective with the other {ctx.env.world_size - 1} process(es) failed "
            f"or timed out after train.dist_timeout_s={cfg.train.dist_timeout_s:g} s; another rank died or "
            f"hangs. The last complete checkpoint in {cfg.train.output_dir} is intact. "
            f"({type(err).__name__}: {err})"
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


class Run:
    """One run: its state, data and hooks, built from the config; ``run`` trains to the end."""

    def __init__(self, cfg: Config, ctx: RunContext, stop: StopSignals):
        self.cfg, self.ctx, self.stop = cfg, ctx, stop
        self.out = Path(cfg.train.output_dir)
        env = ctx.env
        if env.is_main:  # before any compute: a read-only or mistyped folder is a one-line error
            check_writable_dir(self.out, "train.output_dir")
        stats = run_band_stats(cfg)
        self.loader, self.sampler = build_loader(cfg.data, cfg.train.seed, env, ctx.device, stats)
        plan = plan_run(cfg, env.world_size, self.sampler.batches_per_epoch)
        mods = build_modules(cfg, env, ctx.device, ctx.precision)
        self.state = TrainState(mods, build_run_schedules(cfg, plan), plan)
        self.settings = StepSettings(
            ctx.precision,
            ctx.device,
            cfg.optim.clip_grad,
            cfg.optim.freeze_last_layer,
            cfg.train.accumulation_steps,
            D.all_reduce_sum,
            cfg.train.freeze_backbone_epochs,
        )
        self.manager = CheckpointManager(self.out, cfg.train.keep_last)
        self.notes: list[str] = []
        loaded = self.manager.load_latest(map_location=ctx.device) if cfg.train.resume else None
        if loaded is not None:
            self.notes = resume(self.state, *loaded)

    def _hooks(self, monitor: Monitor) -> tuple[list[Hook], Health, StepLog]:
        cfg, env = self.cfg, self.ctx.env
        log = StepLog(monitor, self.state.plan.total_batch)
        health = Health(monitor, CollapseDetector())
        hooks: list[Hook] = [
            NonFiniteGuard(monitor, self.manager, cfg.train.max_nonfinite_steps),
            log,
            health,
            StopVote(self.stop, env.world_size, self.ctx.device),
            EpochLog(monitor, env.rank),
        ]
        stats = run_band_stats(cfg)
        if cfg.monitor.knn_data:
            hooks.append(PeriodicKNN(cfg, monitor, self.ctx.device, stats))
            teacher = self.state.mods.teacher.backbone
            # Attention against masks and over images is drawn on RGB images: multi-band runs skip it.
            jaccard = (
                PeriodicJaccard.for_run(cfg, monitor, teacher) if stats is None and env.is_main else None
            )
            if jaccard is not None:
                hooks.append(jaccard)
        if cfg.monitor.attention_images and env.is_main and stats is None:
            hooks.append(AttentionImages(cfg, monitor))
        saver = ShardedCheckpoints if self.state.mods.sharded else Checkpoints  # FSDP: every rank saves
        hooks.append(saver(self.manager, cfg, env.is_main))  # last: after the epoch's evaluations
        return hooks, health, log

    def _open_monitor(self, note: str) -> Monitor:
        cfg, env, plan = self.cfg, self.ctx.env, self.state.plan
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            if (stats := run_band_stats(cfg)) is not None:  # stored with the run, beside its config
                save_band_stats(stats, self.out / "band_stats.json", {"source": cfg.data.band_stats})
        start = min(self.state.step, plan.total_steps)
        monitor = Monitor(self.out, env.is_main, plan.total_steps, start, cfg.train.progress_bar)
        if env.is_main:
            monitor.text("config", "```yaml\n" + (self.out / "config.yaml").read_text() + "\n```")
        monitor.message(
            f"DINO {cfg.model.arch}"
            + (f"/{cfg.model.patch_size}" if cfg.model.arch.startswith("vit_") else "")
            + f" on {self.ctx.device} ({self.ctx.precision}), {env.world_size} process(es), "
            f"{plan.images_per_epoch} images/epoch, {plan.steps_per_epoch} steps/epoch, "
            f"{cfg.train.epochs} epochs -> {self.out}"
        )
        init = self.state.mods.init_note
        if init and not self.notes:  # a resumed run continues from its checkpoint, not from the file
            monitor.message(init)
            monitor.record("init", self.state.step, {"message": init, "file": cfg.model.init_weights})
        for line in ([f"train.precision {self.ctx.precision}: {note}"] if note else []) + self.notes:
            monitor.message(line)
        return monitor

    def run(self, note: str) -> TrainResult:
        monitor = self._open_monitor(note)
        hooks, health, log = self._hooks(monitor)
        stopped_by = None if self.state.finished else self._loop(hooks)
        D.barrier()
        if stopped_by is not None:
            monitor.message(
                f"stopped by {stopped_by} at step {self.state.step}: checkpoint written; run again to resume"
            )
        monitor.message(
            f"done at step {self.state.step}: checkpoints in {self.out}, teacher backbone in "
            f"{self.out / BACKBONE_EXPORT}, TensorBoard: tensorboard --logdir {self.out / 'tensorboard'}"
        )
        monitor.close()
        mods = self.state.mods
        last_loss = log.last["loss"] if log.last else None
        return TrainResult(
            self.out, self.state.step, self.state.epoch, mods.teacher, mods.student_plain,
            mods.objective.dino.center.clone(), last_loss, stopped_by, health.warnings,
        )  # fmt: skip

    def _loop(self, hooks: list[Hook]) -> str | None:
        """Train until the planned steps are done or a stop is requested; returns the stop's cause."""
        state, cfg = self.state, self.cfg
        while state.epoch < cfg.train.epochs:
            ev = self._epoch(hooks)
            if ev is not None and ev.finished:
                return ev.stopped_by
        return None

    def _masks(self, global_crop: torch.Tensor) -> torch.Tensor:
        """iBOT's masks (2B, N) for this step's two global crops, drawn from (seed, rank, step) alone so
        that a resumed run masks the same patches."""
        ib, p = self.cfg.ibot, patch_size_of(self.state.mods.student_plain.backbone)
        h, w = global_crop.shape[-2] // p, global_crop.shape[-1] // p
        gen = torch.Generator().manual_seed(
            mix_seed(self.cfg.train.seed + 1, self.ctx.env.rank, self.state.step)
        )
        masks = sample_masks(2 * global_crop.shape[0], h, w, ib.mask_ratio, ib.mask_probability, gen)
        return masks.to(self.ctx.device, non_blocking=True)

    def _epoch(self, hooks: list[Hook]) -> StepEvent | None:
        """The rest of the current epoch (from ``state.batch``); the last step's event."""
        state, cfg, device = self.state, self.cfg, self.ctx.device
        epoch = state.epoch
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_batch(state.batch)
        ev, t_prev = None, time.perf_counter()
        for crops, _labels, skipped in self.loader:
            t_data = time.perf_counter() - t_prev
            crops = crops_to_device(crops, device)  # the photometric ops too, with augment_device=cuda
            torch.manual_seed(mix_seed(cfg.train.seed, self.ctx.env.rank, state.step))  # drop path
            values = state.sched.at(state.step)
            log_now = (
                state.step + 1
            ) % cfg.train.log_every_steps == 0 or state.step + 1 == state.plan.total_steps
            masks = self._masks(crops[0]) if state.mods.objective.uses_patches else None
            if state.mods.gram is not None:
                state.mods.gram.before_step(state.step, state.mods.teacher.backbone)
            result = train_step(state.mods, self.settings, crops, values, epoch, log_now, masks)
            epoch_done = state.advance()
            ev = StepEvent(
                state,
                result,
                values,
                epoch,
                epoch_done,
                log_now,
                t_data,
                time.perf_counter() - t_prev,
                skipped,
            )
            for hook in hooks:
                hook.after_step(ev)
            if epoch_done:
                for hook in hooks:
                    hook.after_epoch(state, epoch)
            if ev.finished:
                break
            t_prev = time.perf_counter()
        return ev
