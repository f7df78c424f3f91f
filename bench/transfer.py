"""Does a teacher's attention and k-NN carry over to images unlike its training set? Issue 31's check
before calling a recipe done: score checkpoints on a set of flat silhouettes it never saw, in shapes that
no embedded class uses, half bright on a dark ground and half the other way round.

    python -m bench.transfer runs/demo/checkpoint.pth [more.pth ...] [--out data/transfer]

The set (written once, deterministic; 6 shape classes, 60 train and 30 val images each at 64 px, every
val image with its 0/1 mask): pentagon, octagon, L, T, crescent, ring; a flat fill of one random colour
on a ground of another, with a little noise, one object per image of random size and place. Nothing in
it is textured, so what a teacher learned about the embedded patterns does not help; attention that
follows brightness fails on one polarity, attention that follows the centre fails on off-centre objects.

Per checkpoint, and for a randomly initialised backbone of the first one's shape (built from the
config.yaml beside it, as the demo builds its floor): the scorecard
(``eval.scorecard``: k-NN k = 10 / 20, linear probe, the attention Jaccard by the paper's rule, apart
over brighter and darker objects, and the head-mean mask's), and raw pixels' k-NN as the floor that
features should beat. Prints a table and writes bench/results/transfer.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.args import RESULTS, add_json, write_result
from dino_train.data.embedded_objects import _ring  # the embedded set's own regular-polygon points

SIZE, SS = 64, 2  # drawn at 2x, box-filtered down: smooth edges, masks of the visible pixels
PER_CLASS = {"train": 60, "val": 30}  # images per class and split


def _polygon(points: np.ndarray) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points]


_SHAPES: dict[str, np.ndarray] = {
    "pentagon": _ring(5, start=-math.pi / 2),
    "octagon": _ring(8, start=math.pi / 8),
    "ell": np.array([(-0.7, -0.9), (-0.2, -0.9), (-0.2, 0.4), (0.8, 0.4), (0.8, 0.9), (-0.7, 0.9)]),
    "tee": np.array([(-0.9, -0.9), (0.9, -0.9), (0.9, -0.4), (0.25, -0.4), (0.25, 0.9), (-0.25, 0.9),
                     (-0.25, -0.4), (-0.9, -0.4)]),
}  # fmt: skip
CLASSES = [*_SHAPES, "crescent", "ring"]


def _draw(name: str, rng: np.random.Generator) -> np.ndarray:
    """The object's mask at 2x (bool, SIZE*SS square), rotated, sized and placed at random."""
    side = SIZE * SS
    r = side * rng.uniform(0.16, 0.34)
    centre = rng.uniform(r, side - r, size=2)
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    if name in _SHAPES:
        a = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        draw.polygon(_polygon(centre + (_SHAPES[name] @ rot.T) * r), fill=255)
    else:
        box = [*(centre - r), *(centre + r)]
        draw.ellipse(box, fill=255)
        if name == "ring":
            inner = r * rng.uniform(0.45, 0.6)
            draw.ellipse([*(centre - inner), *(centre + inner)], fill=0)
        else:  # crescent: a disc with an offset disc cut away
            off = r * rng.uniform(0.4, 0.6) * _ring(1, start=rng.uniform(0, 2 * math.pi))[0]
            draw.ellipse([*(centre + off - r), *(centre + off + r)], fill=0)
    return np.asarray(img) > 127


def render(name: str, rng: np.random.Generator, brighter: bool) -> tuple[Image.Image, np.ndarray]:
    """One RGB image and its 0/1 label map: a flat silhouette, brighter or darker than its flat ground."""
    mask = _draw(name, rng)
    light, dark = rng.uniform(170, 245), rng.uniform(15, 85)
    obj, ground = (light, dark) if brighter else (dark, light)
    tint = lambda v: v * (1 + rng.uniform(-0.25, 0.25, size=3))  # noqa: E731 - one colour per region
    rgb = np.where(mask[..., None], tint(obj), tint(ground))
    out = rgb.reshape(SIZE, SS, SIZE, SS, 3).mean((1, 3)) + rng.normal(0, 3.0, (SIZE, SIZE, 3))
    labels = (mask.reshape(SIZE, SS, SIZE, SS).mean((1, 3)) > 0.5).astype(np.uint8)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB"), labels


def generate(root: Path, seed: int = 0, per_class: dict[str, int] = PER_CLASS) -> Path:
    """Write the set under ``root`` (train/, val/, val_masks/) unless it is there already (the same
    ``per_class`` images of each class and split: even indices brighter objects, odd ones darker)."""
    done = root / "val_masks" / CLASSES[-1] / f"{per_class['val'] - 1:05d}.png"
    if done.is_file() and len(list((root / "train" / CLASSES[0]).iterdir())) == per_class["train"]:
        return root
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            if split == "val":
                (root / "val_masks" / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image, labels = render(name, rng, brighter=i % 2 == 0)
                image.save(root / split / name / f"{i:05d}.png")
                if split == "val":
                    Image.fromarray(labels, "L").save(root / "val_masks" / name / f"{i:05d}.png")
    return root


def raw_pixels_knn(root: Path) -> float:
    """k-NN (k = 20) top-1 % on the images' own pixels: the floor features should beat."""
    import torch

    from dino_train.measure.knn_bank import evaluate_knn

    class Pixels(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    knn = evaluate_knn(Pixels(), root / "train", root / "val", ks=(20,), resize=SIZE, crop=SIZE)
    return knn[20][0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints or backbone files to score")
    p.add_argument("--out", type=Path, default=Path("data/transfer"), help="where the set is written")
    p.add_argument("--per-class", type=int, nargs=2, default=[PER_CLASS["train"], PER_CLASS["val"]],
                   metavar=("TRAIN", "VAL"), help="images per class in train/ and val/")  # fmt: skip
    add_json(p, RESULTS / "transfer.json")
    args = p.parse_args(argv)
    from bench.recipes import print_table
    from dino_train.config import load_config
    from dino_train.models.loading import load_backbone
    from eval.scorecard import score_backbone

    root = generate(args.out, per_class=dict(zip(PER_CLASS, args.per_class, strict=True)))
    rows = [{"name": "raw pixels", "k-NN k=20": raw_pixels_knn(root)}]
    for i, path in enumerate(args.checkpoints):
        model, _ = load_backbone(path)
        if i == 0 and (path.parent / "config.yaml").is_file():  # the floor, as the demo's own
            from launch.demo import random_backbone

            fresh = random_backbone(load_config(path.parent / "config.yaml"))
            rows.append({"name": "random init", **score_backbone(fresh, root, SIZE, verbose=False)})
        rows.append({"name": str(path), **score_backbone(model, root, SIZE, verbose=i == 0)})
        print_table(rows, only_present=True)
    write_result(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
