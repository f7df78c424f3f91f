"""``eval_attention``: how well a checkpoint's CLS attention segments objects, as in the DINO paper.

    eval_attention --checkpoint runs/demo/checkpoint.pth --images data/embedded/val \\
        --masks data/embedded/val_masks --output-dir runs/attention

Each image under ``--images`` that has a mask under ``--masks`` at the same relative path (any image
extension; a label map, 0 background and one value per object, 255 void beside other ids as in VOC; a
binary mask is one object) is resized (``--image-size``, short side; 0 keeps it), and its last block's
CLS attention thresholded, per head, to the fewest patches holding ``--threshold`` of the mass.

The headline is the paper's rule (Fig. 4, and its first author in facebookresearch/dino issue 54): for
each object the head whose mask has the best Jaccard index with it; an image scores the mean over its
objects, the set the mean over images. Below it, named apart: the head-mean attention's mask against
each image's foreground, each head's own mask against it, the paper's rule apart over objects brighter
and darker than the rest of their image (attention drawn to bright regions rather than to objects shows
as a gap between the two), and two maps without a model: one map shared by every image, the mean of the
other images' masks (where the objects usually are: attention that finds each object beats it), and
attention spread evenly over each object (what attention wholly on the object scores under the
threshold rule). ``attention_jaccard.json`` holds them all, each image's and object's own scores under
``per_image`` (which images the attention misses), and ``attention_jaccard.png`` a figure of a few.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from dino_train.measure.attention import unwrap_vit
from dino_train.measure.jaccard import (
    EVEN,
    HEAD_MEAN_RULE,
    PAPER_RULE,
    PRIOR,
    JaccardResult,
    folder_jaccard,
)
from dino_train.measure.masks import paired_files
from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.device import DeviceError, pick_device
from dino_train.runtime.files import check_writable_dir, write_json
from eval.common import (
    add_backbone_args,
    backbone_from_args,
    backbone_record,
    print_table,
    refuse_bands,
    run_tool,
    settings_record,
)
from eval.flags import whole

RESULTS_FILE = "attention_jaccard.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_attention", description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument("--images", required=True, type=Path, help="a folder of images (searched recursively)")
    p.add_argument("--masks", required=True, type=Path, help="object masks, same relative paths as images")
    p.add_argument(
        "--image-size", type=whole(0), default=0, help="short side in pixels (default 0: as stored)"
    )
    p.add_argument("--threshold", type=float, default=0.6, help="attention mass the masks keep (default 0.6)")
    p.add_argument("--output-dir", type=Path, help=f"write {RESULTS_FILE} and attention_jaccard.png here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--no-progress", action="store_true", help="accepted by every tool; this one draws no bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args), (DeviceError, ValueError, TypeError))


def _run(args: argparse.Namespace) -> None:
    if not 0.0 < args.threshold <= 1.0 or args.image_size < 0:
        bad = f"--threshold {args.threshold:g}" if args.image_size >= 0 else f"--image-size {args.image_size}"
        raise ValueError(f"{bad}: the threshold is a share of the mass in (0, 1], the size at least 0")
    for name, folder in (("--images", args.images), ("--masks", args.masks)):
        if not folder.is_dir():
            raise ValueError(f"{name} {folder} is not a folder")
    if args.output_dir:  # before any work: an unusable folder fails now, not after the evaluation
        check_writable_dir(args.output_dir, "--output-dir")
    model, info = backbone_from_args(args)
    refuse_bands(info, "eval_attention")
    device = pick_device(args.device)
    model = unwrap_vit(model).to(device)
    result = folder_jaccard(model, args.images, args.masks, args.image_size or None, args.threshold)
    print(
        f"attention Jaccard on {result.objects} objects in {result.images} images "
        f"(threshold {args.threshold:g}), {info['arch']}"
    )
    print_table(["mask from", "Jaccard %"], table_rows(result))
    if args.output_dir:
        write_json(args.output_dir / RESULTS_FILE, {
            **result.as_dict(), "threshold": args.threshold, "image_size": args.image_size,
            "images_dir": str(args.images), "masks_dir": str(args.masks),
            "backbone": backbone_record(info), "settings": settings_record(args, device, 1),
            "per_image": per_image_rows(result, args.images, args.masks),
        })  # fmt: skip
        _figure(model, args)
        print(f"results in {args.output_dir / RESULTS_FILE}")


def table_rows(result: JaccardResult) -> list[list]:
    """The printed table: the paper's rule first, then the other measures, each named for what it is."""
    rows = [[PAPER_RULE, result.best_head_per_object]]
    counts = result.brightness_counts()
    rows += [[f"  {group} ({counts[group]} objects)", j] for group, j in result.by_brightness().items()]
    rows += [[HEAD_MEAN_RULE + " (vs all objects)", result.head_mean_mask]]
    rows += [[f"head {i} (vs all objects)", j] for i, j in enumerate(result.per_head)]
    labels = {PRIOR: "no model: the other masks' mean", EVEN: "no model: even on each object"}
    return rows + [
        [label, result.references[key]] for key, label in labels.items() if key in result.references
    ]


def per_image_rows(result: JaccardResult, images_dir: Path, masks_dir: Path) -> list[dict]:
    """One JSON row per image of ``folder_jaccard(model, images_dir, masks_dir)``, in the order it scored
    them (``result.files``): the image and mask paths relative to their folders, the paper's rule and each
    of its objects (id, best head, Jaccard, brighter or not), the head-mean mask's Jaccard, each head's,
    and whether the foreground is the brighter region."""
    objects: dict[int, list[dict]] = {}
    for o in result.per_object:
        objects.setdefault(o.image, []).append(
            {"id": o.object_id, "best_head": o.head, "jaccard": o.jaccard, "object_brighter": o.brighter}
        )
    rows = []
    r = result
    scores = zip(r.files, r.per_image_paper, r.per_image, r.per_image_heads, r.object_brighter, strict=True)
    for i, ((img, mask), paper, mean, heads, brighter) in enumerate(scores):
        rows.append({
            "image": str(img.relative_to(images_dir)), "mask": str(mask.relative_to(masks_dir)),
            "best_head_per_object": paper, "objects": objects.get(i, []),
            "head_mean_mask": mean, "per_head": heads, "object_brighter": brighter,
        })  # fmt: skip
    return rows


def _figure(model, args: argparse.Namespace) -> None:
    from eval.attention.figures import write_attention_grid

    images = [img for img, _ in paired_files(args.images, args.masks)]
    step = max(len(images) // 4, 1)
    out = args.output_dir / "attention_jaccard.png"
    write_attention_grid(model.cpu(), images[::step][:4], out, args.image_size or None, args.threshold)


if __name__ == "__main__":
    raise SystemExit(main())
