"""Rank-0 run log: TensorBoard scalars, a JSON-lines file, and the console (a progress bar on a terminal,
plain lines elsewhere: Slurm logs and redirected output get no carriage-return frames)."""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dino_train.runtime.progress import use_progress_bar

LINE_INTERVAL_S = 10.0  # plain progress lines at most this often (and on the first and last step)


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class Monitor:
    """Everything is a no-op on ranks other than 0, so callers need no rank checks."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        progress_bar: bool | str = "auto",
    ):
        self.enabled, self.total, self.initial = enabled, total_steps, initial_step
        self.writer = self.bar = self.log_file = None
        self.started, self.last_line = time.perf_counter(), -math.inf
        if not enabled:
            return
        out = Path(output_dir)
        from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and rank 0 only

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        # A run from step 0 starts its log afresh (train.resume=false over an old run); a resumed one appends.
        mode = "a" if initial_step else "w"
        self.log_file = open(out / "log.jsonl", mode, buffering=1)  # noqa: SIM115 - lives as long as the run
        if use_progress_bar(progress_bar):
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self.enabled:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}" if prefix else k, v, step)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        finite = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
        }
        self.log_file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **finite}) + "\n")

    def progress(self, step: int, epoch: int, shown: dict[str, str] | None = None) -> None:
        """After each step: the bar moves; without a bar, a line every LINE_INTERVAL_S seconds (and at the
        first and the last step) shows step, epoch, ``shown`` (loss, lr, ...) and the ETA."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if shown:
                self.bar.set_postfix({"ep": str(epoch), **shown}, refresh=False)
            return
        now = time.perf_counter()
        if shown is None or (
            now - self.last_line < LINE_INTERVAL_S and step not in (self.initial + 1, self.total)
        ):
            return
        self.last_line = now
        rate = (step - self.initial) / max(now - self.started, 1e-9)
        parts = [f"step {step}/{self.total}", f"epoch {epoch}", *(f"{k} {v}" for k, v in shown.items())]
        parts.append(f"eta {_eta((self.total - step) / max(rate, 1e-9))}")
        print("  ".join(parts), flush=True)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text) if self.bar is not None else print(text, flush=True)

    def warn(self, text: str) -> None:
        """A health warning: console, TensorBoard text (health/warnings) and the JSON log."""
        if self.enabled:
            self.message(f"WARNING: {text}")
            self.writer.add_text("health/warnings", text)
            self.record("warning", -1, {"message": text})

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
            self.log_file.close()
