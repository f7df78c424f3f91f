"""Stop requests from the scheduler: SIGTERM, SIGUSR1, SIGUSR2 (what Slurm and submitit send before a time
limit or a preemption). The handler only records the signal; the training loop checkpoints at the next
step boundary and then hands the signal on to whoever handled it before (submitit's requeue), if anyone."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopSignals:
    """Context manager: while inside, the stop signals are recorded in ``received`` instead of acting."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}  # the handlers ours replaced, while installed
        self._replaced: dict[int, Any] = {}  # the same, kept after exit for hand_on

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        try:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker): nothing to install
            self._previous.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._replaced, self._previous = self._previous, {}

    def hand_on(self) -> bool:
        """After the checkpoint: restore the previous handlers and, if the received signal had a Python
        handler before ours (submitit installs one that requeues the job), send it again so that handler
        runs. Returns True when it did."""
        if self._previous:
            self.__exit__()
        signum = self.received
        previous = self._replaced.get(signum) if signum is not None else None
        if callable(previous):
            os.kill(os.getpid(), signum)
            return True
        return False
