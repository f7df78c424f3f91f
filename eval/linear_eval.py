"""``eval_linear``: linear probes on a frozen backbone, a grid of them trained in one pass over the data.

    eval_linear --checkpoint runs/dino/checkpoint.pth --data /data/imagenet --output-dir runs/linear
    eval_linear ... --lr 0.0003 0.001 0.003 --n-last-blocks 1 4 --avgpool both   # 12 probes, one pass
    eval_linear ... --cached-features --epochs 20                               # fast, no augmentation
    eval_linear ... --evaluate --classifier runs/linear/linear_best.pth
    torchrun --nproc_per_node=2 -m eval.linear_eval ...

The release's recipe: SGD momentum 0.9, no weight decay, lr 0.001 * total batch / 256, cosine to 0 over
the epochs (stepped per epoch), RandomResizedCrop + flip for training, Resize + CenterCrop for val,
a Linear(dim, classes) with N(0, 0.01) weights. Val features never change (frozen backbone, fixed crop),
so they are computed once and every epoch's validation is a matrix product.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dino_train.data import DataError, eval_transform
from dino_train.runtime.distributed import barrier, cleanup
from dino_train.runtime.files import CheckpointError, atomic_save
from eval.common import (
    ClassFolders,
    add_backbone_args,
    backbone_from_args,
    class_folders,
    setup_process,
    split_roots,
)
from eval.features import extract_features
from eval.linear_model import (
    GridPoint,
    LinearGrid,
    backbone_tokens,
    default_variant,
    max_blocks,
    variant_features,
)
from eval.linear_report import evaluate_only, finish
from eval.linear_train import (
    Tracker,
    cached_batches,
    image_batches,
    image_loader,
    probe_optimizer,
    resume_probes,
    train_one_epoch,
    train_probe_in_memory,
    train_transform,
    validate,
)

CHECKPOINT_FILE = "linear_checkpoint.pth"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_linear", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_backbone_args(p)
    p.add_argument("--data", required=True, help="folder with train/ and val/ class folders")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, nargs="+", default=[0.001], help="base lr(s) for a total batch of 256")
    p.add_argument("--n-last-blocks", type=int, nargs="+", help="default: 4 (ViT-S/T), 1 (ViT-B)")
    p.add_argument(
        "--avgpool", choices=["auto", "yes", "no", "both"], default="auto", help="auto: ViT-B only"
    )
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument(
        "--cached-features", action="store_true", help="train on centre-crop features, no augmentation"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/linear")
    p.add_argument("--no-resume", action="store_true", help=f"ignore {CHECKPOINT_FILE} in the output dir")
    p.add_argument("--evaluate", action="store_true", help="only evaluate --classifier on val")
    p.add_argument("--classifier", help="a saved probe (ours, or the release's *_linearweights.pth)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
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


def evaluate_linear(
    backbone: torch.nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    n_last_blocks: int | None = None,
    avgpool: bool | None = None,
    lr: float = 0.3,
    epochs: int = 50,
    resize: int = 256,
    crop: int = 224,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> float:
    """Val top-1 % of one linear probe on cached centre-crop features (``--cached-features``), last epoch.

    n_last_blocks/avgpool default to the release's variant for the backbone's width. ``lr`` is for a
    batch of 256; the release's 0.001 is tuned for ImageNet's thousands of steps per epoch, a few thousand
    images need a much larger one. The last epoch is reported, so no epoch is chosen on val.
    """
    n_default, pool_default = default_variant(int(backbone.embed_dim))
    n = min(n_default if n_last_blocks is None else n_last_blocks, max_blocks(backbone))
    pool = pool_default if avgpool is None else avgpool
    tf = eval_transform(resize=resize, crop=crop)
    data = class_folders(train_root, val_root, tf, tf)
    backbone = backbone.to(device)
    splits = []
    for ds in (data.train, data.val):
        tokens, labels = extract_features(
            backbone,
            ds,
            batch_size,
            0,
            device,
            progress=False,
            fn=lambda m, x: backbone_tokens(m, x, n).flatten(1),
        )
        splits += [variant_features(tokens.view(len(labels), n + 1, -1), n, pool), data.remap(ds, labels)]
    _, tracker = train_probe_in_memory(*splits, len(data.classes), epochs, lr, batch_size, device=device)
    return float(tracker.last(0)["top1"])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env, device = setup_process(args.device)
    try:
        backbone, info = backbone_from_args(args)
        backbone.to(device)
        if env.is_main:
            print(f"backbone: {info['arch']} from {info['path']} ({info['source']})", flush=True)
        val_tf = eval_transform(resize=args.resize, crop=args.crop)
        train_tf = val_tf if args.cached_features else train_transform(args.crop)
        data = class_folders(*split_roots(args.data), train_tf, val_tf)
        if args.evaluate:
            evaluate_only(
                args, info, data, lambda ds, n: token_bank(backbone, ds, n, args, device), env.is_main
            )
        else:
            _train(args, backbone, info, data, device, env.rank, env.world_size)
        barrier()
    except (CheckpointError, DataError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        cleanup()
    return 0


def _train(
    args: argparse.Namespace,
    backbone: torch.nn.Module,
    info: dict[str, Any],
    data: ClassFolders,
    device: torch.device,
    rank: int,
    world: int,
) -> None:
    out = Path(args.output_dir)
    points = make_grid_points(args, int(info["embed_dim"]), max_blocks(backbone))
    torch.manual_seed(args.seed)
    grid = LinearGrid(points, int(info["embed_dim"]), len(data.classes)).to(device)
    total_batch = args.batch_size * world
    optimizer, scheduler = probe_optimizer(grid, total_batch, args.epochs)
    tracker = Tracker(len(points))
    settings = {
        "points": [asdict(p) for p in points],
        "classes": data.classes,
        "epochs": args.epochs,
        "total_batch": total_batch,
        "cached_features": args.cached_features,
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
        finish(args, out, points, grid, tracker, data, info, total_batch)


def _fit(
    args: argparse.Namespace,
    backbone: torch.nn.Module,
    data: ClassFolders,
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
    """Train from ``start_epoch`` to the end, validating and checkpointing (rank 0) after every epoch."""
    out, points = Path(args.output_dir), grid.points
    val_tokens, val_labels = token_bank(backbone, data.val, grid.n_max, args, device)
    val_labels = data.remap(data.val, val_labels)
    if args.cached_features:
        train_tokens, train_labels = token_bank(backbone, data.train, grid.n_max, args, device)
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
        tracker.update(epoch + 1, validate(grid, val_tokens, val_labels, device), grid)
        if rank == 0:
            best = max(range(len(points)), key=lambda i: tracker.last(i)["top1"])
            top1, name = tracker.last(best)["top1"], points[best].name
            print(
                f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, best {name} top-1 {top1:.2f}", flush=True
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
