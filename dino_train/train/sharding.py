"""``train.sharding=fsdp``: torch's FSDP2 (``fully_shard``) on the student and the teacher, the EMA and the
per-parameter gradient norms on the local shards, and restoring a run from its sharded checkpoint.

Both models are sharded the same way (every ViT block, then the backbone, then the whole model), so the
teacher's local shard of a parameter lies over the student's: the EMA is a lerp between local tensors,
with no gather. The teacher only runs forward passes; its parameters are all-gathered per block during
them and sharded again after. Checkpoints are written by ``sharded_checkpoint``.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from dino_train.config import Config
from dino_train.config.fields import ConfigError
from dino_train.runtime.files import CheckpointError
from dino_train.train.sharded_reader import checked_reader, read_metadata

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # timm's BatchNormAct2d is one
SHARDED_KEY = "sharded_state"  # in checkpoint.pth: the folder (relative) of the run's sharded state


def check_fsdp(cfg: Config, precision: str) -> None:
    """What FSDP does not support here yet, as a one-line ConfigError before any compute."""
    if precision == "fp16":
        raise ConfigError(
            "train.sharding=fsdp: fp16 needs a sharded gradient scaler; use train.precision=bf16"
        )
    if cfg.optim.optimizer == "lars":
        raise ConfigError(
            "train.sharding=fsdp: LARS's trust ratio needs whole-tensor norms; use adamw or sgd"
        )
    if cfg.gram.weight:
        raise ConfigError(
            "gram.weight: Gram anchoring's frozen teacher copy is not sharded yet; use train.sharding=ddp"
        )
    if cfg.distill.teacher:
        raise ConfigError(
            "distill.teacher: the frozen teacher is not sharded yet; use train.sharding=ddp (every rank "
            "holds the teacher)"
        )
    if cfg.monitor.knn_data or cfg.monitor.attention_images:
        key = "monitor.knn_data" if cfg.monitor.knn_data else "monitor.attention_images"
        raise ConfigError(
            f"{key}: the periodic evaluations run the teacher on some ranks only, which a sharded "
            "teacher cannot do; evaluate the exported teacher_backbone.pth instead"
        )


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16 parameters in the forward and backward passes with fp32 gradient reduction, or all fp32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, precision: str) -> None:
    """fully_shard in place: each block of the backbone (ViT blocks, or a CNN's stages), the backbone
    (a unit of its own so that it also runs alone), the heads' parts, then the model (what remains)."""
    mp = mixed_precision(precision)
    # The backbone's CLS feature is a view of its tokens; FSDP2 warns that an in-place op on it would
    # skip its hook. The training step makes none (test_fsdp checks the steps against DDP's).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    backbone = model.backbone
    units = list(getattr(backbone, "blocks", None) or getattr(backbone, "stages", None) or []) + [backbone]
    # The heads' parts (MLP, prototypes) too: 65536 prototypes make a unit as large as a ViT-B block. The
    # parts, not the head: the wrapper calls the head's parts (project, last_layer), and FSDP gathers a
    # unit's parameters in its forward() only.
    for head in [model.head] + ([model.patch_head] if hasattr(model, "patch_head") else []):
        units += [part for part in head.children() if any(True for _ in part.parameters())]
    # BatchNorm (the head's use_bn) keeps fp32 parameters: FSDP would cast its weight to bf16 while its
    # running statistics, buffers, stay fp32, and batch_norm refuses the mix. Its own unit with an fp32
    # policy casts its input up instead, as autocast does for batch_norm without FSDP; the next Linear's
    # autocast takes the output back to bf16.
    if precision == "bf16":
        keep = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for norm in [m for m in model.modules() if isinstance(m, _NORMS)]:
            fully_shard(norm, mp_policy=keep)
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    # iBOT's pass calls the backbone's forward_features and forward_head, not its forward: FSDP gathers
    # the backbone's own parameters (patch embedding, CLS token, positions, final norm) only in methods
    # it knows of, and the patch embedding once met its input with its weight still sharded.
    for method in ("forward_features", "forward_head"):
        if hasattr(backbone, method):
            register_fsdp_forward_method(backbone, method)
    fully_shard(model, mp_policy=mp)


def reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root's parameters gathered after a forward pass (for the backward that follows);
    the teacher has none, so it gives them back: the EMA writes the shards, the next forward gathers them."""
    if isinstance(model, FSDPModule):
        model.reshard()


@torch.no_grad()
def local_shards(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shard of each DTensor (an alias: writing it writes the parameter), others unchanged."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


@torch.no_grad()
def grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each gradient (P,), whole-tensor norms even when the gradients are sharded: the local
    sums of squares are added over ranks in one all-reduce, never gathering a gradient."""
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.stack(torch._foreach_norm(grads))
    local = local_shards(grads)
    squares = torch.stack(torch._foreach_norm(local)).square()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM)
    return squares.sqrt()


def training_state(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The state dicts a sharded checkpoint holds, keyed by parameter name: DTensor shards under FSDP
    (plain tensors otherwise); torch.distributed.checkpoint reshards them to the reader's world size."""
    return {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
    }


def saved_entries_only(optimizer_state: dict[str, Any], saved: Collection[str]) -> dict[str, Any]:
    """``optimizer_state`` (a fresh optimizer's, as ``get_optimizer_state_dict`` gives it) without the
    entries that the checkpoint's keys ``saved`` lack. torch fills a fresh optimizer's state for every
    trainable parameter (one zero-gradient step), while a run saves none for a parameter that has had no
    gradient yet: the prototypes while ``optim.freeze_last_layer`` holds them (the release's first epoch),
    the backbone under ``train.freeze_backbone_epochs``. Loading asks for every key of the template, so
    without this a checkpoint of those epochs could not be resumed; the parameters left out get no state,
    as in the run that saved it."""
    kept: dict[str, Any] = {}
    for name, entries in optimizer_state["state"].items():
        present = {k: v for k, v in entries.items() if f"optimizer.state.{name}.{k}" in saved}
        if present:
            kept[name] = present
    return {**optimizer_state, "state": kept}


def restore_sharded(mods: Any, ckpt: dict[str, Any], path: Path) -> None:
    """Load the models and the optimizer from the sharded state ``ckpt`` names (any world size, FSDP or
    not), the loss state from ``ckpt`` itself. ``mods``: a TrainModules."""
    rel = ckpt.get(SHARDED_KEY)
    if rel is None:
        raise CheckpointError(
            f"{path} was written with train.sharding=ddp: resume it with ddp, or start a sharded run from "
            "its weights with model.init_weights (the optimizer state is not carried over)"
        )
    folder = Path(path).parent / rel
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{path} names the sharded state {folder}, which is missing or incomplete")
    reader = checked_reader(folder)
    state = training_state(mods.student_plain, mods.teacher, mods.optimizer)
    state["optimizer"] = saved_entries_only(state["optimizer"], read_metadata(folder).state_dict_metadata)
    try:
        dcp.load(state, storage_reader=reader)
        set_model_state_dict(mods.student_plain, state["student"])
        set_model_state_dict(mods.teacher, state["teacher"])
        # Not strict: parameters without saved state (saved_entries_only) stay without, as they were.
        loose = StateDictOptions(strict=False)
        set_optimizer_state_dict(mods.student_plain, mods.optimizer, state["optimizer"], options=loose)
        mods.objective.dino.load_state_dict(ckpt["dino_loss"])
        if mods.objective.uses_patches:
            mods.objective.ibot.load_state_dict(ckpt["ibot_loss"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder} does not fit the model of this config: {err}") from err
