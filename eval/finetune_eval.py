"""``eval_finetune``: fine-tune a pretrained backbone and a linear classifier on a labelled class-folder set.

    eval_finetune --checkpoint runs/demo/checkpoint.pth --data data/embedded --crop 64 --resize 64 \\
        --epochs 30 --output-dir runs/finetune
    torchrun --nproc_per_node=8 -m eval.finetune_eval --checkpoint dino_deitsmall16_pretrain.pth --data DIR
    python -m launch.slurm_eval --kind finetune --checkpoints A.pth B.pth --data DIR -- --epochs 100

The usual recipe of the field (DeiT's, which the DINO authors used for their transfer results, with
BEiT/MAE's layer-wise lr decay): AdamW, lr = --lr * total batch / 256 with a linear warmup then a cosine
to --min-lr (per step), layer-wise lr decay over a ViT's blocks (other backbones: one lr), stochastic
depth, RandAugment + random erasing from timm, label smoothing, optional mixup / cutmix. Validation:
bicubic resize + centre crop, the rule of every evaluation tool (--resize default: crop * 256 / 224).

Writes to --output-dir: finetune_results.json (every epoch's top-1/top-5 on val, the best and the last,
every setting), finetune_best.pth (the best epoch's weights: ``eval_knn --checkpoint-key model`` reads
its backbone), finetune_checkpoint.pth (rerun the same command to resume) and tensorboard/. Epochs are
named by their 0-based index, as in the training log; files count epochs completed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dino_train.data import DataError, eval_transform
from dino_train.models.backbone import check_crop_size
from dino_train.runtime.distributed import all_reduce_sum, barrier, cleanup
from dino_train.runtime.files import CheckpointError, atomic_save, check_writable_dir
from eval.common import (
    HelpFormatter,
    add_backbone_args,
    add_size_args,
    backbone_from_args,
    class_folders,
    default_workers,
    eval_sizes,
    input_error,
    setup_process,
    split_roots,
)
from eval.finetune_model import FineTuneModel, param_groups, set_drop_path
from eval.finetune_report import (
    BEST_FILE,
    Progress,
    backbone_spec_record,
    identity_of,
    run_settings,
    summary_line,
)
from eval.finetune_train import (
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_finetune", description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument("--data", required=True, help="folder with train/ and val/ class folders")
    p.add_argument("--epochs", type=int, default=100, help="DeiT fine-tunes 300 (1000 on CIFAR)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, per process")
    p.add_argument("--lr", type=float, default=5e-4, help="peak lr for a total batch of 256")
    p.add_argument("--min-lr", type=float, default=1e-6, help="the cosine's end")
    p.add_argument(
        "--warmup-epochs", type=int, default=5, help="linear warmup from 0 (at most half the epochs)"
    )
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's, not on biases, norms, tokens")
    p.add_argument("--layer-decay", type=float, default=0.75, help="lr factor per ViT block; 1: none")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last block (ViTs)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off; DeiT's 0.8)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off; DeiT's 1.0)")
    p.add_argument(
        "--randaugment",
        default="rand-m9-mstd0.5-inc1-mmax9",
        help="timm's spelling (DeiT's rand-m9-mstd0.5-inc1, magnitude capped at 9); none: off",
    )
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on a GPU that has it (else fp16), fp32 on the CPU")  # fmt: skip
    p.add_argument("--num-workers", type=int, default=default_workers(), help="decoding processes")
    add_size_args(p)
    p.add_argument("--seed", type=int, default=0, help="classifier init, data order, augmentations")
    p.add_argument("--output-dir", default="runs/finetune", help="results, weights, checkpoint, TensorBoard")
    p.add_argument("--no-resume", action="store_true", help=f"ignore {CHECKPOINT_FILE} in the output dir")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


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
        self.settings = run_settings(self, device, world)
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
        progress.write(self)


def fit(run: FineTune) -> Progress:
    progress = Progress(run.out, run.history, run.rank == 0)
    for epoch in range(run.start_epoch, run.args.epochs):
        record = run.run_epoch(epoch)
        run.history.append(record)
        progress.add(record, run.args.epochs)
        if run.rank == 0:
            run.save(record, progress)
    progress.finish(run)
    return progress


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env, device = setup_process(args.device)
    try:
        check_writable_dir(args.output_dir, "--output-dir")  # before any work, not at the first epoch's end
        run = FineTune(args, env.rank, env.world_size, device)
        if env.is_main:
            info = run.info
            print(f"backbone: {info['arch']} from {info['path']} ({info['source']})", flush=True)
            print(summary_line(run.settings), flush=True)
        fit(run)
        barrier()
    except (CheckpointError, DataError, SystemExit, FloatingPointError) as err:
        raise input_error(err) from None  # "error: ..." on stderr, exit status 2 (a diverged loss too)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
