"""``eval_linear``: linear probes on a frozen backbone, a grid of them trained in one pass over the data.

    eval_linear --checkpoint runs/dino/checkpoint.pth --data /data/imagenet --output-dir runs/linear
    eval_linear ... --lr 0.01 0.1 1 --n-last-blocks 1 4 --avgpool both          # 12 probes, one pass
    eval_linear ... --cached-features --epochs 20                               # fast, no augmentation
    eval_linear ... --cached-features --standardize --lr 0.3 --epochs 50        # the demo's scorecard probe
    eval_linear ... --evaluate --classifier runs/linear/linear_best.pth
    torchrun --nproc_per_node=2 -m eval.linear ...

The release's recipe: SGD momentum 0.9, no weight decay, lr 0.001 * total batch / 256, cosine to 0 over
the epochs (stepped per epoch), RandomResizedCrop + flip for training, Resize + CenterCrop for val,
a Linear(dim, classes) with N(0, 0.01) weights. One difference: by default a grid of base lrs, 0.001 (the
release's, tuned for ImageNet's 1250 steps per epoch) to 1.0 (for data sets of a few thousand images,
whose epochs are a few steps), is trained in the same pass, and the best is reported as the release
reports its own: the highest val top-1 over epochs and probes. Val features never change (frozen
backbone, fixed crop), so they are computed once and every epoch's validation is a matrix product.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dino_train.data.band_augment import band_train_transform, eval_preprocess
from dino_train.data.labelled import ClassFolders, class_folders
from dino_train.measure.features import extract_features
from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.files import atomic_save, check_writable_dir
from eval.common import (
    add_backbone_args,
    add_size_args,
    add_workers_arg,
    backbone_from_args,
    band_inputs,
    eval_sizes,
    run_tool,
    settings_record,
    setup_process,
    split_roots,
)
from eval.flags import POSITIVE, whole
from eval.linear.model import (
    GridPoint,
    LinearGrid,
    backbone_tokens,
    default_variant,
    feature_stats,
    max_blocks,
)
from eval.linear.report import evaluate_only, finish
from eval.linear.train import (
    Tracker,
    cached_batches,
    image_batches,
    image_loader,
    probe_optimizer,
    resume_probes,
    train_one_epoch,
    train_transform,
    validate,
)

CHECKPOINT_FILE = "linear_checkpoint.pth"
# Base lrs (for a batch of 256) trained side by side by default: the release's 0.001 and larger ones for
# data sets whose epochs are a few steps long. On the embedded set (16 steps of 128 per epoch, 20 epochs)
# the release's range 0.0003-0.003 reached 24.0% top-1 where 0.1-1.0 reached 35.4-35.8% (docs/evaluation.md).
DEFAULT_LRS = (0.001, 0.01, 0.1, 1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_linear", description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument("--data", required=True, help="folder with train/ and val/ class folders")
    p.add_argument("--epochs", type=whole(1), default=100, help="the release's 100")
    p.add_argument(
        "--lr",
        type=POSITIVE,
        nargs="+",
        default=list(DEFAULT_LRS),
        help="base lr(s) for a total batch of 256, all trained in the same pass. The release's single "
        "0.001 is tuned for ImageNet's ~1250 steps of 1024 per epoch; a data set of a few thousand images "
        "takes a few steps per epoch and needs 100-1000x more, so the grid spans both",
    )
    p.add_argument("--n-last-blocks", type=whole(1), nargs="+", help="default: 4 (ViT-S/T), 1 (ViT-B)")
    p.add_argument(
        "--avgpool", choices=["auto", "yes", "no", "both"], default="auto", help="auto: ViT-B only"
    )
    p.add_argument("--batch-size", type=whole(1), default=128, help="images per step, per process")
    add_workers_arg(p)
    add_size_args(p)
    p.add_argument(
        "--cached-features", action="store_true", help="train on centre-crop features, no augmentation"
    )
    p.add_argument(
        "--standardize",
        action="store_true",
        help="train on features shifted and scaled by the train split's per-dimension mean and std "
        "(centre crops); the saved probes fold it in and take raw features. Off: the release's probe",
    )
    p.add_argument("--seed", type=whole(0), default=0, help="classifier init and data order")
    p.add_argument("--output-dir", default="runs/linear", help="results, probes, checkpoint, TensorBoard")
    p.add_argument("--no-resume", action="store_true", help=f"ignore {CHECKPOINT_FILE} in the output dir")
    p.add_argument("--evaluate", action="store_true", help="only evaluate --classifier on val")
    p.add_argument("--classifier", help="a saved probe (ours, or the release's *_linearweights.pth)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def make_grid_points(args: argparse.Namespace, embed_dim: int, blocks: int) -> list[GridPoint]:
    n_default, pool_default = default_variant(embed_dim)
    ns = args.n_last_blocks or [min(n_default, blocks)]
    pools = {"auto": [pool_default], "yes": [True], "no": [False], "both": [False, True]}[args.avgpool]
    if blocks == 1 and (max(ns) > 1 or any(pools)):
        raise SystemExit("error: this backbone has no ViT blocks; use --n-last-blocks 1 --avgpool no")
    if max(ns) > blocks or min(ns) < 1:
        raise SystemExit(f"error: --n-last-blocks must lie in [1, {blocks}], got {ns}")
    return [GridPoint(lr, n, pool) for lr in args.lr for n in ns for pool in pools]


def token_bank(
    backbone: torch.nn.Module, dataset: Any, n_max: int, args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token stacks (N, n_max + 1, D) and labels of a whole split, shared over ranks."""
    feats, labels = extract_features(
        backbone,
        dataset,
        args.batch_size,
        args.num_workers,
        device,
        progress=not args.no_progress,
        fn=lambda m, x: backbone_tokens(m, x, n_max).flatten(1),
    )
    return feats.view(len(labels), n_max + 1, -1), labels


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    env, device = setup_process(args.device)
    check_writable_dir(args.output_dir, "--output-dir")  # before any work, not at the first epoch's end
    backbone, info = backbone_from_args(args)
    backbone.to(device)
    if env.is_main:
        print(f"backbone: {info['arch']} from {info['path']} ({info['source']})", flush=True)
    resize, crop = eval_sizes(args)
    stats, channels = band_inputs(info, args)
    val_tf = eval_preprocess(stats, resize, crop)
    augment = train_transform(crop) if stats is None else band_train_transform(stats, crop)
    train_tf = val_tf if args.cached_features else augment
    data = class_folders(*split_roots(args.data), train_tf, val_tf, channels)
    # The centre-crop train split, for the cached features and the statistics of --standardize; with
    # augmentation and --standardize it is a second view of the folder, opened only then.
    centre = data.train if args.cached_features else None
    if centre is None and args.standardize and not args.evaluate:
        centre = class_folders(*split_roots(args.data), val_tf, val_tf, channels).train
    if args.evaluate:
        bank = partial(token_bank, backbone, args=args, device=device)  # (dataset, n) -> tokens, labels
        evaluate_only(args, info, data, bank, env.is_main, settings_record(args, device, env.world_size))
    else:
        _train(args, backbone, info, data, centre, device, env.rank, env.world_size)


def _train(
    args: argparse.Namespace,
    backbone: torch.nn.Module,
    info: dict[str, Any],
    data: ClassFolders,
    centre: Any | None,
    device: torch.device,
    rank: int,
    world: int,
) -> None:
    """``centre``: the train split at the val transform (``data.train`` itself with --cached-features;
    None when neither --cached-features nor --standardize needs it)."""
    out = Path(args.output_dir)
    points = make_grid_points(args, int(info["embed_dim"]), max_blocks(backbone))
    n_max = max(p.n_last_blocks for p in points)
    train_bank = None
    if centre is not None:
        tokens, labels = token_bank(backbone, centre, n_max, args, device)
        train_bank = (tokens, data.remap(centre, labels))
    stats = feature_stats(train_bank[0]) if args.standardize else None
    torch.manual_seed(args.seed)
    grid = LinearGrid(points, int(info["embed_dim"]), len(data.classes), stats).to(device)
    total_batch = args.batch_size * world
    optimizer, scheduler = probe_optimizer(grid, total_batch, args.epochs)
    tracker = Tracker(len(points))
    settings = {
        "points": [asdict(p) for p in points],
        "classes": data.classes,
        "epochs": args.epochs,
        "total_batch": total_batch,
        "cached_features": args.cached_features,
        "standardize": args.standardize,
        "backbone": f"{info['path']} [{info.get('checkpoint_key') or 'backbone'}]",
    }
    start_epoch = resume_probes(
        out / CHECKPOINT_FILE, settings, grid, optimizer, scheduler, tracker, args.no_resume
    )
    if rank == 0 and start_epoch:
        print(f"resumed from {out / CHECKPOINT_FILE} after epoch {start_epoch}", flush=True)

    if start_epoch < args.epochs:
        _fit(
            args,
            backbone,
            data,
            train_bank,
            grid,
            optimizer,
            scheduler,
            tracker,
            settings,
            start_epoch,
            device,
            rank,
            world,
        )
    if rank == 0:
        finish(
            args, out, points, grid, tracker, data, info, total_batch, settings_record(args, device, world)
        )


def _fit(
    args: argparse.Namespace,
    backbone: torch.nn.Module,
    data: ClassFolders,
    train_bank: tuple[torch.Tensor, torch.Tensor] | None,
    grid: LinearGrid,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tracker: Tracker,
    settings: dict[str, Any],
    start_epoch: int,
    device: torch.device,
    rank: int,
    world: int,
) -> None:
    """Train from ``start_epoch`` to the end, validating and checkpointing (rank 0) after every epoch.
    ``train_bank``: the centre-crop train token stacks and labels (used with --cached-features)."""
    out, points = Path(args.output_dir), grid.points
    val_tokens, val_labels = token_bank(backbone, data.val, grid.n_max, args, device)
    val_labels = data.remap(data.val, val_labels)
    if args.cached_features:
        train_tokens, train_labels = train_bank
    else:
        loader = image_loader(
            data.train, args.batch_size, args.num_workers, args.seed, rank, world, device.type == "cuda"
        )
    for epoch in range(start_epoch, args.epochs):
        if args.cached_features:
            batches = cached_batches(
                train_tokens, train_labels, args.batch_size, epoch, args.seed, rank, world
            )
            total = None
        else:
            loader.sampler.set_epoch(epoch)
            batches, total = image_batches(loader, backbone, grid.n_max, device), len(loader)
        loss = train_one_epoch(
            grid, optimizer, batches, device, world, not args.no_progress and rank == 0, total
        )
        scheduler.step()
        tracker.update(epoch, validate(grid, val_tokens, val_labels, device), grid)
        if rank == 0:
            best = max(range(len(points)), key=lambda i: tracker.last(i)["top1"])
            top1, name = tracker.last(best)["top1"], points[best].name
            print(
                f"epoch {epoch} ({epoch + 1}/{args.epochs} done): loss {loss:.4f}, "
                f"best {name} top-1 {top1:.2f}",
                flush=True,
            )
            out.mkdir(parents=True, exist_ok=True)
            state = {
                **settings,
                "epoch": epoch + 1,
                "grid": grid.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "tracker": tracker.state_dict(),
            }
            atomic_save(state, out / CHECKPOINT_FILE)


if __name__ == "__main__":
    raise SystemExit(main())
