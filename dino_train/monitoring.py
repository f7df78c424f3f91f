"""Rank-0 monitoring: progress bar, TensorBoard scalars and a JSON-lines log."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


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
