"""Run under torchrun by test_faults: train, with one rank made to die or hang at a given step."""

import os
import signal
import sys
import time

from dino_train.config import load_config
from dino_train.runtime.distributed import detect_env
from dino_train.train import loop as train_module
from dino_train.train import step as engine

if __name__ == "__main__":
    mode, fault_step, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    env = detect_env()
    real_step = engine.train_step
    calls = {"n": 0}

    def faulty_step(*args, **kwargs):
        calls["n"] += 1
        if env.rank == 1 and calls["n"] == fault_step:
            if mode == "die":
                os._exit(7)
            # Hang; SIGTERM keeps its default action so torchrun's clean-up does not wait its 30 s grace.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)
        return real_step(*args, **kwargs)

    train_module.train_step = faulty_step
    try:
        train_module.train(load_config(None, overrides))
    except train_module.PeerError as err:
        print(f"PEER ERROR: {err}", file=sys.stderr, flush=True)
        sys.exit(3)
