"""``visualize_attention``: the CLS self-attention of a checkpoint on an image, a folder of images, a video
or a folder of video frames.

Per image: ``image.png``, ``attn-head{i}.png`` / ``attn-mean.png`` heat maps, ``mask-head{i}.png`` /
``mask-mean.png`` (the fewest patches holding ``--threshold`` of the attention mass), ``overlay-*.png`` of
each on the image, and ``grid.png`` with all of them. A video becomes ``<name>-attention.mp4`` (H.264,
yuv420p, the source frame rate) showing the head-mean attention of every frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dino_train.data import IMAGE_EXTENSIONS
from dino_train.measure.attention import prepare_image, unwrap_vit, vit_patch_size
from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.device import DeviceError, pick_device
from dino_train.runtime.files import check_writable_dir
from dino_train.runtime.progress import use_progress_bar
from eval.attention.figures import open_image, write_image_outputs
from eval.attention.video import VIDEO_EXTENSIONS, VisualizeError, video_frames, write_attention_video
from eval.common import add_backbone_args, backbone_from_args, refuse_bands, run_tool
from eval.flags import POSITIVE, whole


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="visualize_attention", description=__doc__, formatter_class=HelpFormatter
    )
    add_backbone_args(p)
    p.add_argument("--input", required=True, type=Path, help="an image, a folder of images, or a video")
    p.add_argument("--video-frames", action="store_true", help="--input is a folder of video frames")
    p.add_argument("--output", required=True, type=Path, help="folder for the outputs")
    p.add_argument("--image-size", type=whole(0), default=480, help="short side in pixels; 0 keeps the size")
    p.add_argument("--threshold", type=float, default=0.6, help="share of attention mass the masks keep")
    p.add_argument("--block", type=int, default=-1, help="transformer block (-1: the last)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--batch-size", type=whole(1), default=8, help="video frames per forward pass")
    p.add_argument("--side-by-side", action="store_true", help="show the input beside the attention")
    p.add_argument("--apply-mask", action="store_true", help="videos: the masked frame, not the heat map")
    p.add_argument("--fps", type=POSITIVE, help="output frame rate (default: the source's; 25 for frames)")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none off a terminal or under Slurm)"
    )
    args = p.parse_args(argv)
    if args.image_size < 0 or args.batch_size < 1 or not 0.0 <= args.threshold <= 1.0:
        p.error("need --image-size >= 0, --batch-size >= 1 and --threshold in [0, 1]")
    return args


def _images_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise VisualizeError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def run(args: argparse.Namespace) -> list[Path]:
    """Everything the command line asks for; returns the files written."""
    src: Path = args.input
    if not src.exists():
        raise VisualizeError(f"input {src} does not exist")
    if args.video_frames and not src.is_dir():
        raise VisualizeError(f"--video-frames needs a folder of frames; {src} is a file")
    check_writable_dir(args.output, "--output")  # an unusable folder fails now, not after the model ran
    # Check the input before the (slower) checkpoint load, so a wrong path fails at once.
    is_video = src.is_file() and src.suffix.lower() in VIDEO_EXTENSIONS
    frame_paths = _images_in(src) if src.is_dir() else []
    if is_video:
        frames, fps, total = video_frames(src)
    elif args.video_frames:
        frames, fps, total = (open_image(f) for f in frame_paths), None, len(frame_paths)
    model, info = backbone_from_args(args)
    refuse_bands(info, "visualize_attention")
    try:
        model = unwrap_vit(model).to(pick_device(args.device))
    except TypeError as err:
        raise VisualizeError(f"{args.checkpoint}: {err}") from err
    size = args.image_size or None
    if is_video or args.video_frames:
        out = args.output / f"{src.stem if is_video else src.name}-attention.mp4"
        n = write_attention_video(
            model, frames, out, args.fps or fps or 25.0, size, args.threshold, args.block, args.batch_size,
            side_by_side=args.side_by_side, apply_mask=args.apply_mask, total=total,
            progress=not args.no_progress and use_progress_bar(),
        )  # fmt: skip
        print(f"wrote {out} ({n} frames)")
        return [out]
    p = vit_patch_size(model)
    written = []
    for path in frame_paths or [src]:
        # One image: its files go straight into --output; a folder: one sub-folder per image.
        out_dir = args.output / path.relative_to(src).with_suffix("") if frame_paths else args.output
        try:
            x = prepare_image(open_image(path), size, p)
        except ValueError as err:
            raise VisualizeError(f"{path}: {err}") from err
        written += write_image_outputs(model, x, out_dir, args.threshold, args.block, args.side_by_side)
        print(f"wrote {out_dir} ({x.shape[-2]}x{x.shape[-1]} px)")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: run(args), (VisualizeError, DeviceError, ValueError, IndexError))


if __name__ == "__main__":
    raise SystemExit(main())
