"""Run under torchrun by test_faults and test_fsdp: train, with rank 1 made to die or hang.

fault_rank.py die|hang STEP [overrides...]            at the start of its STEP-th training step
fault_rank.py die-in-save|hang-in-save N [overrides]  in its N-th sharded (FSDP) save, after it has
                                                      written its own shards and before the save ends
"""

import os
import signal
import sys
import time

from torch.distributed.checkpoint.filesystem import FileSystemWriter

from dino_train.config import load_config
from dino_train.runtime.distributed import detect_env
from dino_train.train import loop as train_module
from dino_train.train import step as engine


def fault(mode: str) -> None:
    if mode.startswith("die"):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no handler, no clean-up, as the OOM killer does
    # Hang; SIGTERM keeps its default action so torchrun's clean-up does not wait its 30 s grace.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(3600)


def fault_at(real, mode: str, at: int, rank: int):
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == at and not mode.endswith("-in-save"):
            fault(mode)
        result = real(*args, **kwargs)
        if rank == 1 and calls["n"] == at and mode.endswith("-in-save"):
            fault(mode)  # its shard files are on disk; the metadata and the rename are not
        return result

    return faulty


if __name__ == "__main__":
    mode, at, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rank = detect_env().rank
    if mode.endswith("-in-save"):
        FileSystemWriter.write_data = fault_at(FileSystemWriter.write_data, mode, at, rank)
    else:
        train_module.train_step = fault_at(engine.train_step, mode, at, rank)
    try:
        train_module.train(load_config(None, overrides))
    except train_module.PeerError as err:
        print(f"PEER ERROR: {err}", file=sys.stderr, flush=True)
        sys.exit(3)
