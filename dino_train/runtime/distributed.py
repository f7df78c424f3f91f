"""Process layout: the only module that reads the launcher's environment (torchrun, Slurm, or none)."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dino_train.runtime.slurm_env import slurm_layout


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, local rank, world size and master address from torchrun's or Slurm's variables.

    torchrun's win where both are set (``srun torchrun ...``: torchrun's agents form the group). Under
    Slurm alone, a step of more than one task is one group (``slurm_env.slurm_layout``); a bad Slurm
    variable raises ``SlurmEnvError`` naming it.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    layout = slurm_layout(env)
    if layout is not None and layout.world_size > 1:
        return DistEnv(
            rank=layout.rank,
            local_rank=layout.local_rank,
            world_size=layout.world_size,
            master_addr=layout.master_addr,
            master_port=layout.master_port,
            source="slurm",
        )
    return DistEnv()


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group when there is more than one process; a single process needs none.

    NCCL on GPUs, gloo on CPU. The timeout bounds how long a rank waits for a dead or hung peer.
    """
    if env.world_size == 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity in a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value on every rank (identity in a single process)."""
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on this machine (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
