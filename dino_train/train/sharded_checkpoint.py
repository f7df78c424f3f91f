"""Checkpoints of a ``train.sharding=fsdp`` run: the training state sharded (torch.distributed.checkpoint),
and the release's files beside it.

Each save writes, in order:
1. ``sharded/stepNNNNNNNN/``: student, teacher and optimizer state, every rank its own shards
   (``torch.distributed.checkpoint``; read back at any world size);
2. ``checkpoint-stepNNNNNNNN.pth`` / ``checkpoint.pth`` in the release's layout, by rank 0: student and
   teacher gathered whole on rank 0 (so the evaluation tools and the release's code read them), the loss
   state, the position, the config, and ``sharded_state`` naming the folder of step 1; its ``optimizer``
   entry is empty (the optimizer state is in the sharded folder only);
3. ``teacher_backbone.pth``, from the gathered teacher.
A run killed during step 1 leaves ``checkpoint.pth`` naming the previous complete state. Sharded folders
that no numbered checkpoint names any more are removed with them (``train.keep_last``).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dino_train.runtime import distributed as D
from dino_train.runtime.files import with_prefix
from dino_train.train.checkpoint import BACKBONE_EXPORT, export_backbone
from dino_train.train.hooks import Checkpoints
from dino_train.train.sharding import SHARDED_KEY, training_state
from dino_train.train.spec import run_spec
from dino_train.train.state import TrainState, checkpoint_state

SHARDED_DIR = "sharded"
_STEP = re.compile(r"^step\d{8}(\.tmp)?$")  # .tmp: a save that a killed run left unfinished


def gather_full(model: Any) -> dict[str, Any]:
    """The model's whole state dict on rank 0 (CPU tensors), {} on the other ranks; every rank calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@dataclass
class ShardedCheckpoints(Checkpoints):
    """``Checkpoints`` for FSDP runs: every rank takes part in a save (see the module's docstring)."""

    def save(self, state: TrainState, keep_epoch: int | None = None) -> None:
        mods, out = state.mods, Path(self.cfg.train.output_dir)
        name = f"step{state.step:08d}"
        tmp = out / SHARDED_DIR / f"{name}.tmp"
        # All ranks have written their shards when this returns on rank 0 (it gathers their results
        # before writing the metadata), so rank 0 may then rename the folder.
        dcp.save(training_state(mods.student_plain, mods.teacher, mods.optimizer), checkpoint_id=tmp)
        student, teacher = gather_full(mods.student_plain), gather_full(mods.teacher)
        if self.is_main:
            final = tmp.with_name(name)
            shutil.rmtree(final, ignore_errors=True)  # a folder left by a run killed before its .pth
            tmp.rename(final)
            weights = {"student": with_prefix(student, "module."), "teacher": teacher, "optimizer": {}}
            ckpt = checkpoint_state(state, self.cfg, weights)
            ckpt[SHARDED_KEY] = f"{SHARDED_DIR}/{name}"
            self.manager.save(ckpt, state.step, keep_epoch)
            backbone = {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}
            spec = run_spec(self.cfg)
            export_backbone(backbone, out / BACKBONE_EXPORT, spec)
            self._prune(out / SHARDED_DIR)
        D.barrier()  # no rank runs ahead into a step while rank 0 still writes

    def _prune(self, folder: Path) -> None:
        """Remove sharded folders that no numbered checkpoint names (checkpoint{epoch}.pth copies keep
        their gathered weights; resuming from one needs its sharded folder, kept while it is recent)."""
        kept = {f"step{step:08d}" for step, _ in self.manager.numbered()}
        for d in folder.iterdir():
            if d.is_dir() and _STEP.match(d.name) and d.name not in kept:
                shutil.rmtree(d, ignore_errors=True)
