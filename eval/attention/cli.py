"""``eval_attention``: how well a checkpoint's CLS attention segments objects, as in the DINO paper.

    eval_attention --checkpoint runs/demo/checkpoint.pth --images data/embedded/val \\
        --masks data/embedded/val_masks --output-dir runs/attention

Each image under ``--images`` that has a mask under ``--masks`` at the same relative path (any image
extension; nonzero pixels are the object) is resized (``--image-size``, short side; 0 keeps it), its
last block's CLS attention thresholded to the fewest patches holding ``--threshold`` of the mass (per
head and for the head mean), and the Jaccard index with the object mask computed per image; the
averages are printed and written to ``attention_jaccard.json``, with each image's own scores under
``per_image`` (which images the attention misses), and a figure of a few images. The head mean is also
averaged apart over the images whose object is brighter than the rest and those where it is darker:
attention drawn to bright regions rather than to objects shows as a gap between the two.

Two rows need no model and say what the number means on this set: the same measure for one map shared
by every image, the mean of the other images' masks (where the objects usually are: attention that finds
each object beats it), and for attention spread evenly over each object (what attention wholly on the
object scores under the threshold rule).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from dino_train.measure.attention import unwrap_vit
from dino_train.measure.jaccard import EVEN, PRIOR, JaccardResult, folder_jaccard, paired_files
from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.device import DeviceError, pick_device
from dino_train.runtime.files import check_writable_dir, write_json
from eval.common import (
    add_backbone_args,
    backbone_from_args,
    backbone_record,
    print_table,
    run_tool,
    settings_record,
)

RESULTS_FILE = "attention_jaccard.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_attention", description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument("--images", required=True, type=Path, help="a folder of images (searched recursively)")
    p.add_argument("--masks", required=True, type=Path, help="object masks, same relative paths as images")
    p.add_argument("--image-size", type=int, default=0, help="short side in pixels (default 0: as stored)")
    p.add_argument("--threshold", type=float, default=0.6, help="attention mass the masks keep (default 0.6)")
    p.add_argument("--output-dir", type=Path, help=f"write {RESULTS_FILE} and attention_jaccard.png here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--no-progress", action="store_true", help="accepted by every tool; this one draws no bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args), (DeviceError, ValueError, TypeError))


def _run(args: argparse.Namespace) -> None:
    for name, folder in (("--images", args.images), ("--masks", args.masks)):
        if not folder.is_dir():
            raise ValueError(f"{name} {folder} is not a folder")
    if args.output_dir:  # before any work: an unusable folder fails now, not after the evaluation
        check_writable_dir(args.output_dir, "--output-dir")
    model, info = backbone_from_args(args)
    device = pick_device(args.device)
    model = unwrap_vit(model).to(device)
    result = folder_jaccard(model, args.images, args.masks, args.image_size or None, args.threshold)
    print(f"attention Jaccard on {result.images} images (threshold {args.threshold:g}), {info['arch']}")
    rows = [["mean of heads", result.mean]] + [[f"head {i}", j] for i, j in enumerate(result.per_head)]
    labels = {PRIOR: "no model: the other masks' mean", EVEN: "no model: even on the object"}
    rows += [[label, result.references[key]] for key, label in labels.items() if key in result.references]
    counts = result.brightness_counts()
    rows += [[f"mean of heads, {group} ({counts[group]})", j] for group, j in result.by_brightness().items()]
    print_table(["mask from", "Jaccard %"], rows)
    if args.output_dir:
        write_json(args.output_dir / RESULTS_FILE, {
            **result.as_dict(), "threshold": args.threshold, "image_size": args.image_size,
            "images_dir": str(args.images), "masks_dir": str(args.masks),
            "backbone": backbone_record(info), "settings": settings_record(args, device, 1),
            "per_image": per_image_rows(result, args.images, args.masks),
        })  # fmt: skip
        _figure(model, args)
        print(f"results in {args.output_dir / RESULTS_FILE}")


def per_image_rows(result: JaccardResult, images_dir: Path, masks_dir: Path) -> list[dict]:
    """One JSON row per image of ``folder_jaccard(model, images_dir, masks_dir)``, in the order it scored
    them (``result.files``): the image and mask paths relative to their folders, the head-mean Jaccard,
    each head's, and whether the object is the brighter region."""
    rows = []
    scores = zip(result.files, result.per_image, result.per_image_heads, result.object_brighter, strict=True)
    for (img, mask), mean, heads, brighter in scores:
        rel_img, rel_mask = str(img.relative_to(images_dir)), str(mask.relative_to(masks_dir))
        rows.append(
            {"image": rel_img, "mask": rel_mask, "mean": mean, "per_head": heads, "object_brighter": brighter}
        )
    return rows


def _figure(model, args: argparse.Namespace) -> None:
    from eval.attention.figures import write_attention_grid

    images = [img for img, _ in paired_files(args.images, args.masks)]
    step = max(len(images) // 4, 1)
    out = args.output_dir / "attention_jaccard.png"
    write_attention_grid(model.cpu(), images[::step][:4], out, args.image_size or None, args.threshold)


if __name__ == "__main__":
    raise SystemExit(main())
