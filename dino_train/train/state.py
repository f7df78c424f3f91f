"""What a checkpoint holds of a run, restoring it, and where a resumed run continues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dino_train.config import Config, to_dict
from dino_train.runtime.files import CheckpointError, strip_prefix, with_prefix
from dino_train.train.step import TrainModules


def checkpoint_state(
    mods: TrainModules, cfg: Config, world_size: int, epoch: int, batch: int, step: int, spe: int
) -> dict[str, Any]:
    state = {
        "student": with_prefix(mods.student_plain.state_dict(), "module."),
        "teacher": mods.teacher.state_dict(),
        "optimizer": mods.optimizer.state_dict(),
        "epoch": epoch,  # the epoch to run next (the one in progress when batch_in_epoch > 0)
        "batch_in_epoch": batch,
        "step": step,
        "steps_per_epoch": spe,
        "world_size": world_size,
        "samples_seen": step * cfg.data.batch_size_per_gpu * world_size,
        "dino_loss": mods.dino_loss.state_dict(),
        "config": to_dict(cfg),
        "format_version": 1,
    }
    if mods.scaler is not None:
        state["fp16_scaler"] = mods.scaler.state_dict()
    return state


def restore(mods: TrainModules, state: dict[str, Any], path: Path) -> None:
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


def resume_point(
    state: dict[str, Any], path: Path, steps_per_epoch: int, batch_size: int, world_size: int
) -> tuple[int, int, int, list[str]]:
    """(step, epoch, batch in epoch, notes) at which a run resumed from ``state`` continues.

    With another world size or batch the steps per epoch differ; the schedules then continue by the
    number of samples seen, which is what they measure.
    """
    step, epoch, batch = state["step"], state["epoch"], state["batch_in_epoch"]
    notes = []
    if state.get("steps_per_epoch") != steps_per_epoch:
        step = round(state["samples_seen"] / (batch_size * world_size))
        epoch, batch = divmod(step, steps_per_epoch)
        notes.append(
            f"steps per epoch changed ({state.get('steps_per_epoch')} -> {steps_per_epoch}, world size "
            f"{state.get('world_size')} -> {world_size}); schedules continue by samples seen, at step {step}"
        )
    notes.insert(0, f"resumed from {path} at epoch {epoch}, batch {batch}, step {step}")
    return step, epoch, batch, notes
