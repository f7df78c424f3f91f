"""The loop's hooks, each with one job, called after every step and at every epoch's end: the
non-finite guard, step logging, the collapse detector, the stop vote across ranks, checkpoints, and the
per-epoch log. (Periodic evaluation hooks are in ``dino_train.monitor.periodic``.)"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from dino_train.config import Config
from dino_train.core.schedules import StepValues
from dino_train.monitor.health import CollapseDetector
from dino_train.monitor.logger import Monitor
from dino_train.runtime import distributed as D
from dino_train.runtime.signals import StopSignals
from dino_train.train.checkpoint import BACKBONE_EXPORT, CheckpointManager, export_backbone
from dino_train.train.spec import run_spec
from dino_train.train.state import TrainState, checkpoint_state
from dino_train.train.step import StepOutput


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


@dataclass
class StepEvent:
    """One finished step as the hooks see it; hooks earlier in the list may fill in the last fields."""

    state: TrainState
    result: StepOutput
    values: StepValues
    epoch: int  # the epoch the step's batch belongs to
    epoch_done: bool
    log_now: bool
    t_data: float
    t_step: float
    skipped_files: int
    scalars: dict[str, float] | None = None  # read on logging steps by StepLog
    stopped_by: str | None = None  # set by StopVote when a stop was requested

    @property
    def finished(self) -> bool:
        return self.state.finished or self.stopped_by is not None


class Hook(Protocol):
    def after_step(self, ev: StepEvent) -> None: ...

    def after_epoch(self, state: TrainState, epoch: int) -> None: ...


class BaseHook:
    def after_step(self, ev: StepEvent) -> None:
        pass

    def after_epoch(self, state: TrainState, epoch: int) -> None:
        pass


@dataclass
class NonFiniteGuard(BaseHook):
    """A skipped step is reported; ``limit`` of them in a row stop the run, naming the last checkpoint."""

    monitor: Monitor
    manager: CheckpointManager
    limit: int
    in_a_row: int = 0

    def after_step(self, ev: StepEvent) -> None:
        self.in_a_row = 0 if ev.result.applied else self.in_a_row + 1
        if ev.result.applied:
            return
        step = ev.state.step
        self.monitor.message(f"step {step}: non-finite gradients, step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            last = self.manager.numbered()[-1][1] if self.manager.numbered() else "none yet"
            raise NonFiniteError(
                f"{self.in_a_row} consecutive non-finite steps up to step {step} (epoch {ev.epoch}); "
                f"last good checkpoint: {last} (left intact). Try a lower optim.lr, "
                "train.precision=bf16 or fp32, or a larger dino.warmup_teacher_temp_epochs."
            )


# TensorBoard groups: related curves side by side; the rest go to health/.
GROUPS = {
    **dict.fromkeys(
        ("loss", "loss_dino", "loss_global_global", "loss_global_local", "loss_koleo", "loss_ibot"), "loss"
    ),
    **dict.fromkeys(("lr", "weight_decay", "momentum", "teacher_temp"), "schedule"),
    **dict.fromkeys(("grad_norm", "grad_norm_backbone", "grad_norm_head"), "grad"),
    **dict.fromkeys(("images_per_s", "step_time_s", "data_time_s"), "speed"),
}


def step_scalars(ev: StepEvent, total_batch: int) -> dict[str, float]:
    """The step's scalars: the only host syncs of the loop, on logging steps."""
    res, v = ev.result, ev.values
    scalars = {
        "loss": res.loss.item(),
        **{k: t.item() for k, t in res.parts.items()},
        "lr": v.lr,
        "weight_decay": v.weight_decay,
        "momentum": v.momentum,
        "teacher_temp": v.teacher_temp,
        "grad_norm": res.grad_norm.item(),
        "images_per_s": total_batch / max(ev.t_step, 1e-9),
        "step_time_s": ev.t_step,
        "data_time_s": ev.t_data,
    }
    scalars.update({k: t.item() for k, t in res.metrics.items()})
    return scalars


@dataclass
class StepLog(BaseHook):
    """Scalars to TensorBoard (grouped) and log.jsonl on logging steps; the console's progress always."""

    monitor: Monitor
    total_batch: int
    shown: dict[str, str] | None = None  # what the console shows, from the last logged step
    last: dict[str, float] | None = None  # the last logged step's scalars

    def after_step(self, ev: StepEvent) -> None:
        if ev.log_now:
            ev.scalars = self.last = s = step_scalars(ev, self.total_batch)
            for k, v in s.items():
                self.monitor.scalars(ev.state.step, {f"{GROUPS.get(k, 'health')}/{k}": v}, prefix="")
            self.monitor.record("step", ev.state.step, {"epoch": ev.epoch, **s})
            self.shown = {
                "loss": f"{s['loss']:.4f}",
                "lr": f"{s['lr']:.2e}",
                "img/s": f"{s['images_per_s']:.1f}",
            }
        self.monitor.progress(ev.state.step, ev.epoch, self.shown if ev.log_now else None)


@dataclass
class Health(BaseHook):
    """The collapse detector on every logged step's scalars; warnings go to the log and are kept."""

    monitor: Monitor
    detector: CollapseDetector = field(default_factory=CollapseDetector)
    warnings: list[str] = field(default_factory=list)

    def after_step(self, ev: StepEvent) -> None:
        if ev.scalars is None:
            return
        for warning in self.detector.check(ev.scalars, ev.state.step):
            self.warnings.append(warning)
            self.monitor.warn(warning)


@dataclass
class StopVote(BaseHook):
    """Whether any rank got a stop signal; every rank must agree so that they all stop at the same step."""

    stop: StopSignals
    world_size: int
    device: torch.device

    def after_step(self, ev: StepEvent) -> None:
        flag = self.stop.received is not None
        if self.world_size > 1:
            flag = bool(D.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)
        if flag:
            received = self.stop.received
            ev.stopped_by = signal.Signals(received).name if received else "a signal to another rank"


@dataclass
class Checkpoints(BaseHook):
    """Rank 0 saves at every epoch's end (keeping ``checkpoint{epoch:04}.pth`` every ``saveckp_freq``
    epochs), every ``every_steps`` steps, and when the run ends mid-epoch; the teacher backbone is
    exported with each."""

    manager: CheckpointManager
    cfg: Config
    is_main: bool

    def save(self, state: TrainState, keep_epoch: int | None = None) -> None:
        if self.is_main:
            self.manager.save(checkpoint_state(state, self.cfg), state.step, keep_epoch)
            spec = run_spec(self.cfg)
            export_backbone(
                state.mods.teacher.backbone, Path(self.cfg.train.output_dir) / BACKBONE_EXPORT, spec
            )

    def after_step(self, ev: StepEvent) -> None:
        every = self.cfg.train.checkpoint_every_steps
        if not ev.epoch_done and (ev.finished or (every and ev.state.step % every == 0)):
            self.save(ev.state)

    def after_epoch(self, state: TrainState, epoch: int) -> None:
        # Named by the epoch just finished, 0-based, every saveckp_freq epochs from 0: the release's names.
        freq = self.cfg.train.saveckp_freq
        self.save(state, epoch if freq and epoch % freq == 0 else None)


@dataclass
class EpochLog(BaseHook):
    """Unreadable files skipped in the epoch (per rank), and one ``epoch`` record in the log."""

    monitor: Monitor
    rank: int
    skipped: int = 0

    def after_step(self, ev: StepEvent) -> None:
        self.skipped += ev.skipped_files

    def after_epoch(self, state: TrainState, epoch: int) -> None:
        if self.skipped:
            self.monitor.message(
                f"epoch {epoch}: skipped {self.skipped} unreadable image(s) on rank {self.rank}"
            )
        self.monitor.record("epoch", state.step, {"epoch": epoch, "skipped_files": self.skipped})
        self.monitor.scalars(state.step, {"skipped_files": self.skipped})
        self.skipped = 0
