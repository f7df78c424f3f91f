"""Plain helpers the tests share (fixtures live in conftest.py): where the repository is, the environment
of the processes the tests start, a tiny training's overrides, torchrun with N processes over gloo, a
run's logged steps and its process tree, and a training checkpoint's layout in miniature.

No test file imports another test file: what two of them need is here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing

from dino_train.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]

# One thread per process (two cores, often several processes at once); the checkout on the path, so the
# tests' rank scripts and `python -m` find the project where it is not installed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def tiny_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """A ViT-Tiny/8 on 32 px crops with a small head: a step takes a fraction of a second. On the tiny
    embedded set (40 train images, batch 8): 5 steps per epoch, 2 epochs."""
    return [
        f"data.path={data / 'train'}",
        f"train.output_dir={out}",
        "model.arch=vit_tiny",
        "model.patch_size=8",
        "model.out_dim=64",
        "model.head_hidden_dim=32",
        "model.head_bottleneck_dim=16",
        "data.batch_size_per_gpu=8",
        "data.num_workers=0",
        "data.global_crops_size=32",
        "data.local_crops_size=16",
        "data.local_crops_number=2",
        "optim.warmup_epochs=1",
        "train.epochs=2",
        "train.precision=fp32",
        "train.progress_bar=false",
        "train.log_every_steps=1",
        *extra,
    ]


# ---------------------------------------------------------------- processes


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """torchrun with ``nproc`` processes on this machine (gloo on the CPU) running ``args``: a script
    and its arguments, or ``-m module ...``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *args,
    ]


def torchrun(
    nproc: int, *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run :func:`torchrun_cmd` to its end from the repository root; its output captured as text."""
    return subprocess.run(
        torchrun_cmd(nproc, *args), cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=timeout
    )


def fork_ranks(fn: Callable[..., None], *args: object, nprocs: int = 2) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes forked from this one (no fresh interpreter importing
    torch again, as torchrun's or ``mp.spawn``'s take seconds each), on one torch thread each (the
    DataLoader's rule for forked workers); raises if any of them fails. ``fn`` joins its own group."""
    torch.multiprocessing.start_processes(
        _on_one_thread, args=(fn, *args), nprocs=nprocs, join=True, start_method="fork"
    )


def _on_one_thread(rank: int, fn: Callable[..., None], *args: object) -> None:
    torch.set_num_threads(1)
    fn(rank, *args)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process below it, one by one (not a process group: torchrun's workers
    are not in the agent's)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def logged_steps(out: Path) -> list[int]:
    """The steps the run writing ``out`` has logged so far."""
    log = out / "log.jsonl"
    if not log.exists():
        return []
    return [json.loads(x)["step"] for x in log.read_text().splitlines() if '"kind": "step"' in x]


def wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    """Return once the run writing ``out`` has logged ``step``. If it ends first or takes longer than
    ``timeout`` seconds, end it (and whatever it started) and fail with the end of its stderr."""
    deadline = time.time() + timeout
    while not (steps := logged_steps(out)) or max(steps) < step:
        ended = proc.poll() is not None
        if ended or time.time() > deadline:
            kill_tree(proc)
            why = "ended early" if ended else f"did not log step {step} in {timeout:.0f} s"
            raise AssertionError(f"run {why}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


# ---------------------------------------------------------------- checkpoints


def training_state(step: int, size: int = 8) -> dict:
    """Our checkpoint layout in miniature."""
    return {
        "student": {"module.backbone.w": torch.full((size,), float(step))},
        "teacher": {"backbone.w": torch.arange(size, dtype=torch.float32) + step},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": step,
        "step": step,
        "dino_loss": {"center": torch.zeros(1, 3)},
        "config": {"train": {"epochs": 3}},
    }
