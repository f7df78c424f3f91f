"""The demo: generate the embedded data set, pretrain DINO on it on this machine, and show that the
teacher's features got better than a random backbone's (k-NN on the held-out split).

``python -m launch.demo [section.key=value ...]`` (``make demo`` runs it after setting up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dino_train.checkpoint import CheckpointError
from dino_train.config import ConfigError, load_config
from dino_train.data import DataError, generate_embedded_dataset
from dino_train.models import build_backbone
from dino_train.train import train

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument(
        "--data-dir", type=Path, default=Path("data/embedded"), help="where the data set is written"
    )
    p.add_argument("--skip-knn", action="store_true", help="do not run the k-NN comparison at the end")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)

    t0 = time.time()
    try:
        root = generate_embedded_dataset(args.data_dir)
        print(f"embedded data set: {root} (train/ and val/ class folders)", flush=True)
        # k-NN every few epochs and attention maps in TensorBoard, on the embedded set's own splits.
        defaults = [
            f"data.path={root / 'train'}",
            f"monitor.knn_data={root}",
            f"monitor.attention_images={root / 'val'}",
        ]
        cfg = load_config(args.config, [*defaults, *args.overrides])
        result = train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = result.output_dir
    print(f"\npretraining took {time.time() - t0:.0f} s")
    print(f"checkpoints:      {out}/checkpoint.pth (and checkpoint-step*.pth)")
    print(f"teacher backbone: {out}/teacher_backbone.pth")
    print(f"TensorBoard:      tensorboard --logdir {out}/tensorboard")
    print(f"log:              {out}/log.jsonl")
    if not args.skip_knn:
        compare_knn(result.teacher.backbone, cfg, root)
    grid = attention_grid(result.teacher.backbone, root, out)
    print(f"\nattention of the teacher on a few held-out images: {grid}")
    return 0


def attention_grid(teacher: torch.nn.Module, root: Path, out: Path) -> Path:
    """The last block's CLS attention (mean and heads, 60% masks) on one image of each of four classes."""
    from eval.visualize import write_attention_grid

    classes = sorted(p for p in (root / "val").iterdir() if p.is_dir())[:4]
    images = [sorted(c.glob("*.png"))[0] for c in classes]
    return write_attention_grid(teacher.cpu().float(), images, out / "attention_grid.png", image_size=None)


def compare_knn(teacher: torch.nn.Module, cfg, root: Path) -> None:
    """k-NN accuracy of the trained teacher next to a randomly initialised backbone of the same shape."""
    from eval.knn_eval import evaluate_knn

    size = cfg.data.global_crops_size
    m = cfg.model
    torch.manual_seed(cfg.train.seed + 1)
    random_backbone = build_backbone(m.arch, m.patch_size, m.img_size or size)
    kw = dict(ks=(10, 20), resize=size, crop=size, batch_size=128, device="cpu")
    trained = evaluate_knn(teacher.cpu().float(), root / "train", root / "val", **kw)
    random = evaluate_knn(random_backbone, root / "train", root / "val", **kw)
    print("\nk-NN on the held-out split (top-1 %):")
    print(f"{'k':>4} | {'random init':>11} | {'DINO teacher':>12}")
    for k in trained:
        print(f"{k:>4} | {random[k][0]:>11.1f} | {trained[k][0]:>12.1f}")


if __name__ == "__main__":
    sys.exit(main())
