"""One fine-tuning run of ``eval_finetune``: the model, optimiser, loader and lr schedule built from the
flags, resumed from its checkpoint when there is one, trained and validated epoch by epoch."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from dino_train.data import DataError, eval_transform
from dino_train.data.labelled import class_folders
from dino_train.models.backbone import check_crop_size
from dino_train.runtime.distributed import all_reduce_sum
from dino_train.runtime.files import atomic_save
from eval.common import backbone_from_args, eval_sizes, refuse_bands, settings_record, split_roots
from eval.finetune.model import FineTuneModel, param_groups, set_drop_path
from eval.finetune.report import BEST_FILE, Progress, backbone_spec_record, identity_of
from eval.finetune.train import (
    CHECKPOINT_FILE,
    StepSettings,
    load_checkpoint,
    lr_schedule,
    make_mixup,
    save_checkpoint,
    seed_epoch,
    train_loader,
    train_one_epoch,
    train_transform,
    validate,
)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise SystemExit("error: --precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return requested
    if device.type != "cuda":
        return "fp32"  # exact, and the CPU is a place for small checks, not for speed
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class FineTune:
    """One fine-tuning run: built from the flags, resumed from its checkpoint when there is one."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.out = Path(args.output_dir)
        self._build_model()
        self._build_training()
        self.settings = self.describe()
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0 if args.no_resume else self._resume()
        self.trained = self.model  # what the steps run: the DDP wrapper under torchrun
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.trained = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _build_model(self) -> None:
        """The pretrained backbone (trainable, with drop path), the data, and the classifier."""
        args = self.args
        resize, crop = eval_sizes(args)
        try:  # flags first: a bad one fails before the checkpoint is read
            train_tf = train_transform(crop, args.randaugment, args.reprob)
            backbone, self.info = backbone_from_args(args)
            refuse_bands(self.info, "eval_finetune")
            check_crop_size(backbone, crop, "--crop")
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        backbone.requires_grad_(True)
        self.drop_path = set_drop_path(backbone, args.drop_path)
        self.data = class_folders(*split_roots(args.data), train_tf, eval_transform(resize, crop))
        torch.manual_seed(args.seed)  # the classifier's init
        self.model = FineTuneModel(backbone, len(self.data.classes)).to(self.device)

    def _build_training(self) -> None:
        """AdamW over the layer-decay groups, the step settings, the loader and the per-step lr."""
        args, device = self.args, self.device
        groups, self.plan = param_groups(self.model, args.weight_decay, args.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))
        precision = resolve_precision(args.precision, device)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        mixup = make_mixup(args.mixup, args.cutmix, args.smoothing, len(self.data.classes))
        self.step = StepSettings(precision, device, args.smoothing, mixup, args.clip_grad, scaler)
        self.loader = train_loader(
            self.data.train, args.batch_size, args.num_workers, args.seed, self.rank, self.world,
            device.type == "cuda",
        )  # fmt: skip
        if len(self.loader) == 0:
            raise DataError(f"{args.data}/train: no training images")
        self.total_batch = args.batch_size * self.world
        peak = args.lr * self.total_batch / 256
        self.lrs = lr_schedule(peak, args.min_lr, args.epochs, len(self.loader), args.warmup_epochs)

    def describe(self) -> dict[str, Any]:
        """Every flag (the resize actually used for --resize's default), the device and process count, and
        what the flags resolved to: total batch, peak lr, steps per epoch, the lr spread, drop path."""
        args = self.args
        return settings_record(args, self.device, self.world) | {
            "total_batch": self.total_batch,
            "lr_scaled": args.lr * self.total_batch / 256,
            "steps_per_epoch": len(self.loader),
            "layer_decay_applied": self.plan.describe(),
            "drop_path_applied": args.drop_path if self.drop_path else "none (not a ViT)",
            "precision_used": self.step.precision,
            "mixup_applied": self.step.mixup is not None,
        }

    def _resume(self) -> int:
        state = load_checkpoint(self.out / CHECKPOINT_FILE, identity_of(self.settings))
        if state is None:
            return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.step.scaler is not None and state.get("scaler"):
            self.step.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        if self.rank == 0:
            print(f"resumed from {self.out / CHECKPOINT_FILE} after {state['epoch']} epoch(s)", flush=True)
        return int(state["epoch"])

    def _val_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.data.remap(self.data.val, labels)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` (0-based), validate, and return its record."""
        args, start = self.args, time.perf_counter()
        seed_epoch(args.seed, epoch, self.rank)
        self.loader.sampler.set_epoch(epoch)
        steps = len(self.loader)
        draw = not args.no_progress and self.rank == 0
        loss = train_one_epoch(
            self.trained, self.loader, self.optimizer, self.lrs, epoch * steps, self.step, draw
        )
        loss = float(all_reduce_sum(torch.tensor([loss], dtype=torch.float64))) / self.world
        acc = validate(
            self.model, self.data.val, self._val_labels, args.batch_size, args.num_workers, self.device,
            self.step.precision,
        )  # fmt: skip
        lr = float(self.lrs[min((epoch + 1) * steps, len(self.lrs)) - 1])
        seconds = time.perf_counter() - start
        return {"epoch": epoch, "train_loss": loss, "lr": lr, **acc, "seconds": round(seconds, 2)}

    def save(self, record: dict[str, Any], progress: Progress) -> None:
        """Rank 0: the best weights when this epoch is the best, the checkpoint, the results."""
        state = {"model": self.model.state_dict(), "classes": self.data.classes, "arch": self.info["arch"]}
        state["backbone"] = backbone_spec_record(self.model.backbone, self.info)
        done = record["epoch"] + 1  # files count epochs completed, as the release's checkpoints do
        if progress.best is record:
            atomic_save(
                state | {"epoch": done, "top1": record["top1"], "top5": record["top5"]}, self.out / BEST_FILE
            )
        scaler = self.step.scaler.state_dict() if self.step.scaler is not None else None
        extra = {"optimizer": self.optimizer.state_dict(), "scaler": scaler, "history": self.history}
        save_checkpoint(
            self.out / CHECKPOINT_FILE,
            state | extra | {"epoch": done, "identity": identity_of(self.settings)},
        )
        progress.write(self.data, self.info, self.settings)


def fit(run: FineTune) -> Progress:
    progress = Progress(run.out, run.history, run.rank == 0)
    for epoch in range(run.start_epoch, run.args.epochs):
        record = run.run_epoch(epoch)
        run.history.append(record)
        progress.add(record, run.args.epochs)
        if run.rank == 0:
            run.save(record, progress)
    progress.finish(run.data, run.info, run.settings)
    return progress
