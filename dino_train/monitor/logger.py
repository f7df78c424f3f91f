"""Rank-0 monitoring: progress bar, TensorBoard scalars and a JSON-lines log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from dino_train.core.schedules import StepValues

if TYPE_CHECKING:
    from dino_train.train.step import StepOutput


class Monitor:
    """Everything is a no-op on ranks other than 0, so callers need no rank checks."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        progress_bar: bool = True,
    ):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.log_file = None
        if not enabled:
            return
        out = Path(output_dir)
        from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and rank 0 only

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.log_file = open(out / "log.jsonl", "a", buffering=1)  # noqa: SIM115 - lives as long as the run
        self.bar = tqdm(
            total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, disable=not progress_bar
        )

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.log_file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")

    def advance(self, n: int, postfix: dict[str, str] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text) if self.bar is not None else print(text, flush=True)

    def warn(self, text: str) -> None:
        """A health warning: console, TensorBoard text (health/warnings) and the JSON log."""
        if not self.enabled:
            return
        self.message(f"WARNING: {text}")
        self.writer.add_text("health/warnings", text)
        self.record("warning", -1, {"message": text})

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.close()
        self.log_file.close()


# TensorBoard groups: related curves side by side.
GROUPS = {
    "loss": "loss",
    "loss_global_global": "loss",
    "loss_global_local": "loss",
    "lr": "schedule",
    "weight_decay": "schedule",
    "momentum": "schedule",
    "teacher_temp": "schedule",
    "grad_norm": "grad",
    "grad_norm_backbone": "grad",
    "grad_norm_head": "grad",
    "images_per_s": "speed",
    "step_time_s": "speed",
    "data_time_s": "speed",
}


def step_scalars(
    res: StepOutput, values: StepValues, t_data: float, t_step: float, total_batch: int
) -> dict[str, float]:
    """Read the step's scalars: the only host syncs of the loop, on logging steps."""
    scalars = {
        "loss": res.loss.item(),
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
    scalars.update({k: v.item() for k, v in res.metrics.items()})
    return scalars


def log_scalars(monitor: Monitor, step: int, epoch: int, scalars: dict[str, float]) -> None:
    """TensorBoard (grouped: loss/, schedule/, grad/, speed/, health/) and one JSON line."""
    if not monitor.enabled:
        return
    for k, v in scalars.items():
        monitor.writer.add_scalar(f"{GROUPS.get(k, 'health')}/{k}", v, step)
    finite = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
    monitor.record("step", step, {"epoch": epoch, **finite})
    monitor.advance(
        0, {"loss": f"{scalars['loss']:.4f}", "img/s": f"{scalars['images_per_s']:.1f}", "ep": str(epoch)}
    )
