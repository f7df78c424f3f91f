"""The demo: generate the embedded data set, pretrain DINO on it on this machine, and show that the
teacher's features got better than a random backbone's (k-NN and a linear probe on the held-out split).

``python -m launch.demo [section.key=value ...]`` (``make demo`` runs it after setting up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dino_train.config import ConfigError, load_config
from dino_train.data import DataError, generate_embedded_dataset
from dino_train.models import build_backbone
from dino_train.runtime.files import CheckpointError
from dino_train.train import train

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument(
        "--data-dir", type=Path, default=Path("data/embedded"), help="where the data set is written"
    )
    p.add_argument(
        "--skip-eval",
        "--skip-knn",
        action="store_true",
        help="do not compare k-NN and linear probe with a random backbone at the end",
    )
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
        if not any(o.startswith("train.output_dir=") for o in args.overrides):
            cfg = load_config(args.config, [*defaults, *args.overrides, *free_output_dir(cfg)])
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
    if not args.skip_eval:
        compare_to_random(result.teacher.backbone, cfg, root)
    grid = attention_grid(result.teacher.backbone, root, out)
    print(f"\nattention of the teacher on a few held-out images: {grid}")
    return 0


def free_output_dir(cfg) -> list[str]:
    """Keep the demo one command: an output dir holding a run of another model (say, an older demo
    recipe) is left alone and the run goes to the next free ``<dir>-N``, instead of stopping with the
    trainer's does-not-fit error. Returns the override to add (none when the dir is fine)."""
    out = Path(cfg.train.output_dir)
    saved = out / "config.yaml"
    if not saved.is_file() or not any(out.glob("checkpoint*.pth")):
        return []  # no run to resume there: training starts afresh and writes its own config
    try:
        same = load_config(saved).model == cfg.model
    except ConfigError:  # written by another version of the schema
        same = False
    if same:
        return []
    n = 1
    while Path(f"{out}-{n}").exists():
        n += 1
    print(f"{out} holds a run of another model (see its config.yaml); left as it is, writing to {out}-{n}")
    return [f"train.output_dir={out}-{n}"]


def attention_grid(teacher: torch.nn.Module, root: Path, out: Path) -> Path:
    """The last block's CLS attention (mean and heads, 60% masks) on one image of each of four classes."""
    from eval.visualize import write_attention_grid

    classes = sorted(p for p in (root / "val").iterdir() if p.is_dir())[:4]
    images = [sorted(c.glob("*.png"))[0] for c in classes]
    return write_attention_grid(teacher.cpu().float(), images, out / "attention_grid.png", image_size=None)


def compare_to_random(teacher: torch.nn.Module, cfg, root: Path) -> dict[str, dict[str, float]]:
    """k-NN and linear-probe top-1 of the trained teacher next to a random backbone of the same shape."""
    from eval.knn_eval import evaluate_knn
    from eval.linear_eval import evaluate_linear

    size = cfg.data.global_crops_size
    m = cfg.model
    torch.manual_seed(cfg.train.seed + 1)
    models = {
        "random init": build_backbone(m.arch, m.patch_size, m.img_size or size),
        "DINO teacher": teacher.cpu().float(),
    }
    scores: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        knn = evaluate_knn(
            model, root / "train", root / "val", ks=(10, 20), resize=size, crop=size, batch_size=128
        )
        scores[name] = {f"k-NN k={k}": top1 for k, (top1, _) in knn.items()}
        scores[name]["linear probe"] = evaluate_linear(
            model, root / "train", root / "val", resize=size, crop=size
        )
    print(
        "\non the held-out split (top-1 %; linear: last 4 blocks' CLS tokens, 50 epochs on cached features):"
    )
    print(f"{'':>12} | {'random init':>11} | {'DINO teacher':>12}")
    for row in scores["random init"]:
        print(f"{row:>12} | {scores['random init'][row]:>11.1f} | {scores['DINO teacher'][row]:>12.1f}")
    return scores


if __name__ == "__main__":
    sys.exit(main())
