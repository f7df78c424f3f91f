"""``eval_finetune``: fine-tune a pretrained backbone and a linear classifier on a labelled class-folder set.

    eval_finetune --checkpoint runs/demo/checkpoint.pth --data data/embedded --crop 64 --resize 64 \\
        --epochs 30 --output-dir runs/finetune
    torchrun --nproc_per_node=8 -m eval.finetune --checkpoint dino_deitsmall16_pretrain.pth --data DIR
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
from collections.abc import Sequence

from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.files import check_writable_dir
from eval.common import (
    add_backbone_args,
    add_size_args,
    add_workers_arg,
    run_tool,
    setup_process,
)
from eval.finetune.report import summary_line
from eval.finetune.runner import FineTune, fit
from eval.finetune.train import CHECKPOINT_FILE
from eval.flags import NON_NEGATIVE, POSITIVE, PROBABILITY, real, whole


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_finetune", description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument("--data", required=True, help="folder with train/ and val/ class folders")
    p.add_argument("--epochs", type=whole(1), default=100, help="DeiT fine-tunes 300 (1000 on CIFAR)")
    p.add_argument("--batch-size", type=whole(1), default=64, help="images per step, per process")
    p.add_argument("--lr", type=POSITIVE, default=5e-4, help="peak lr for a total batch of 256")
    p.add_argument("--min-lr", type=NON_NEGATIVE, default=1e-6, help="the cosine's end")
    p.add_argument(
        "--warmup-epochs", type=whole(0), default=5, help="linear warmup from 0 (at most half the epochs)"
    )
    p.add_argument(
        "--weight-decay", type=NON_NEGATIVE, default=0.05, help="AdamW's, not on biases, norms, tokens"
    )
    p.add_argument(
        "--layer-decay", type=real(0, 1, lo_open=True), default=0.75, help="lr factor per ViT block; 1: none"
    )
    p.add_argument(
        "--drop-path",
        type=real(0, 1, hi_open=True),
        default=0.1,
        help="stochastic depth of the last block (ViTs)",
    )
    p.add_argument("--smoothing", type=real(0, 1, hi_open=True), default=0.1, help="label smoothing")
    p.add_argument("--mixup", type=NON_NEGATIVE, default=0.0, help="mixup alpha (0: off; DeiT's 0.8)")
    p.add_argument("--cutmix", type=NON_NEGATIVE, default=0.0, help="cutmix alpha (0: off; DeiT's 1.0)")
    p.add_argument(
        "--randaugment",
        default="rand-m9-mstd0.5-inc1-mmax9",
        help="timm's spelling (DeiT's rand-m9-mstd0.5-inc1, magnitude capped at 9); none: off",
    )
    p.add_argument("--reprob", type=PROBABILITY, default=0.25, help="random erasing probability")
    p.add_argument("--clip-grad", type=NON_NEGATIVE, default=0.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on a GPU that has it (else fp16), fp32 on the CPU")  # fmt: skip
    add_workers_arg(p)
    add_size_args(p)
    p.add_argument("--seed", type=whole(0), default=0, help="classifier init, data order, augmentations")
    p.add_argument("--output-dir", default="runs/finetune", help="results, weights, checkpoint, TensorBoard")
    p.add_argument("--no-resume", action="store_true", help=f"ignore {CHECKPOINT_FILE} in the output dir")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args), (FloatingPointError,))


def _run(args: argparse.Namespace) -> None:
    env, device = setup_process(args.device)
    check_writable_dir(args.output_dir, "--output-dir")  # before any work, not at the first epoch's end
    run = FineTune(args, env.rank, env.world_size, device)
    if env.is_main:
        info = run.info
        print(f"backbone: {info['arch']} from {info['path']} ({info['source']})", flush=True)
        print(summary_line(run.settings), flush=True)
    fit(run)


if __name__ == "__main__":
    raise SystemExit(main())
