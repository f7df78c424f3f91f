"""A run's state (models, optimizer, scaler, loss state, schedules, position in the data), what a
checkpoint holds of it, and restoring it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dino_train.config import Config, RunPlan, to_dict
from dino_train.core.schedules import Schedules
from dino_train.models import WeightNormLinear
from dino_train.runtime.distributed import DistEnv
from dino_train.runtime.files import CheckpointError, strip_prefix, with_prefix
from dino_train.train.checkpoint import FORMAT_VERSION
from dino_train.train.distill import CHECKPOINT_KEY as DISTILL_KEY
from dino_train.train.distill import check_resumed
from dino_train.train.sharding import SHARDED_KEY, restore_sharded
from dino_train.train.spec import run_spec
from dino_train.train.step import TrainModules


@dataclass(frozen=True)
class RunContext:
    """Where this process runs: its place in the launch, its device and the precision it trains in."""

    env: DistEnv
    device: torch.device
    precision: str


@dataclass
class TrainState:
    """Everything that changes during a run. ``epoch`` and ``batch`` are the position of the next batch
    to train on (``batch`` batches of ``epoch`` are done); ``step`` counts optimizer steps."""

    mods: TrainModules
    sched: Schedules
    plan: RunPlan
    step: int = 0
    epoch: int = 0
    batch: int = 0

    def advance(self) -> bool:
        """Count one finished step; returns True when it ended its epoch."""
        self.step += 1
        self.batch += 1
        if self.batch == self.plan.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            return True
        return False

    @property
    def finished(self) -> bool:
        return self.step >= self.plan.total_steps


def checkpoint_state(state: TrainState, cfg: Config, weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """The release's layout (student ``module.*``, teacher, optimizer, epoch, dino_loss, fp16_scaler) plus
    ours: the position, the config and the backbone's timm name and kwargs, all plain data. ``weights``
    replaces the student, teacher and optimizer entries (an FSDP run's, gathered: sharded_checkpoint)."""
    mods, plan = state.mods, state.plan
    if weights is None:
        weights = {
            "student": with_prefix(mods.student_plain.state_dict(), "module."),
            "teacher": mods.teacher.state_dict(),
            "optimizer": mods.optimizer.state_dict(),
        }
    ckpt = {
        **weights,
        "epoch": state.epoch,  # the epoch to run next (the one in progress when batch_in_epoch > 0)
        "batch_in_epoch": state.batch,
        "step": state.step,
        "steps_per_epoch": plan.steps_per_epoch,
        "world_size": plan.world_size,
        "samples_seen": state.step * plan.total_batch,
        "dino_loss": mods.objective.dino.state_dict(),
        "config": to_dict(cfg),
        "backbone": run_spec(cfg).as_dict(),
        "format_version": FORMAT_VERSION,
    }
    if mods.objective.uses_patches:
        ckpt["ibot_loss"] = mods.objective.ibot.state_dict()
    if mods.gram is not None:
        ckpt["gram_teacher"] = mods.gram.state_dict()
    if mods.distill_record is not None:
        ckpt[DISTILL_KEY] = dict(mods.distill_record)
    if mods.scaler is not None:
        ckpt["fp16_scaler"] = mods.scaler.state_dict()
    return ckpt


def _stats_text(stats: dict | None) -> str:
    if stats is None:
        return "ImageNet's RGB statistics"
    return f"per-band mean {stats.get('mean')} and std {stats.get('std')}"


def restore(mods: TrainModules, ckpt: dict[str, Any], path: Path) -> None:
    if mods.distill_record is not None:
        check_resumed(mods.distill_record, ckpt.get(DISTILL_KEY), path)
    recorded = (ckpt.get("backbone") or {}).get("input_stats")
    if recorded != mods.input_stats:
        raise CheckpointError(
            f"{path} was trained on inputs normalised by {_stats_text(recorded)}; this run's data.band_stats "
            f"gives {_stats_text(mods.input_stats)}. Resuming would change what its inputs mean: point "
            "data.band_stats at the statistics the run started with, or train.output_dir elsewhere."
        )
    if mods.sharded or SHARDED_KEY in ckpt:  # an FSDP run, or a run resuming an FSDP run's checkpoint
        restore_sharded(mods, ckpt, path)
        return
    try:
        mods.student_plain.load_state_dict(strip_prefix(ckpt["student"], "module."))
        mods.teacher.load_state_dict(ckpt["teacher"])
        mods.objective.dino.load_state_dict(ckpt["dino_loss"])
        if mods.objective.uses_patches:
            mods.objective.ibot.load_state_dict(ckpt["ibot_loss"])
        mods.optimizer.load_state_dict(_upgrade_optimizer(ckpt, mods))
        if mods.gram is not None and "gram_teacher" in ckpt:  # without: the first snapshot is still due
            mods.gram.load_state_dict(ckpt["gram_teacher"])
    except (RuntimeError, ValueError, KeyError) as err:
        hint = ""
        if "pos_embed" in str(err) and ckpt.get("format_version", 1) < 2:
            hint = (
                " This checkpoint predates the 224 px position grid (format 2): its grid covers the global "
                "crop size, so resume it with model.img_size=<data.global_crops_size>."
            )
        raise CheckpointError(
            f"{path} does not fit the model of this config (another architecture or out_dim?): {err}\n"
            f"Nothing was overwritten; point train.output_dir elsewhere or fix the config.{hint}"
        ) from err
    if mods.scaler is not None and "fp16_scaler" in ckpt:
        mods.scaler.load_state_dict(ckpt["fp16_scaler"])


def _upgrade_optimizer(ckpt: dict[str, Any], mods: TrainModules) -> dict[str, Any]:
    """Format 1 held the last layer as weight_v, weight_g; optimizer states are kept by position, so a
    trainable pair (norm_last_layer false) gets its two states swapped into the current order."""
    opt = ckpt["optimizer"]
    if ckpt.get("format_version", FORMAT_VERSION) >= 2:
        return opt
    position = {id(p): i for i, p in enumerate(p for g in mods.optimizer.param_groups for p in g["params"])}
    state = dict(opt["state"])
    for module in mods.student_plain.modules():
        if isinstance(module, WeightNormLinear) and module.weight_g.requires_grad:
            g, v = position[id(module.weight_g)], position[id(module.weight_v)]
            state[g], state[v] = opt["state"].get(v), opt["state"].get(g)
    return {**opt, "state": {k: s for k, s in state.items() if s is not None}}


def resume(state: TrainState, ckpt: dict[str, Any], path: Path) -> list[str]:
    """Restore ``state`` from a checkpoint and set where it continues; returns notes for the log.

    With another world size or batch the steps per epoch differ; the schedules then continue by the
    number of samples seen, which is what they measure.
    """
    restore(state.mods, ckpt, path)
    step, epoch, batch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    spe = state.plan.steps_per_epoch
    notes = []
    if ckpt.get("steps_per_epoch") != spe:
        step = round(ckpt["samples_seen"] / state.plan.total_batch)
        epoch, batch = divmod(step, spe)
        notes.append(
            f"steps per epoch changed ({ckpt.get('steps_per_epoch')} -> {spe}, world size "
            f"{ckpt.get('world_size')} -> {state.plan.world_size}); schedules continue by samples seen, "
            f"at step {step}"
        )
    state.step, state.epoch, state.batch = step, epoch, batch
    notes.insert(0, f"resumed from {path} at epoch {epoch}, batch {batch}, step {step}")
    return notes
