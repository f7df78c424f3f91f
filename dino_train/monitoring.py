"""Rank-0 monitoring: progress bar, TensorBoard scalars and a JSON-lines log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dino_train.engine import StepOutput
from dino_train.schedules import StepValues


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

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.close()
        self.log_file.close()


def log_step(
    monitor: Monitor,
    res: StepOutput,
    values: StepValues,
    step: int,
    epoch: int,
    t_data: float,
    t_step: float,
    total_batch: int,
) -> float:
    """Read the step's scalars (the only host syncs of the loop) and log them; returns the loss."""
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
