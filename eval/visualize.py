"""``visualize_attention``: the CLS self-attention of a checkpoint on an image, a folder of images, a video
or a folder of video frames.

Per image: ``image.png``, ``attn-head{i}.png`` / ``attn-mean.png`` heat maps, ``mask-head{i}.png`` /
``mask-mean.png`` (the fewest patches holding ``--threshold`` of the attention mass), ``overlay-*.png`` of
each on the image, and ``grid.png`` with all of them. A video becomes ``<name>-attention.mp4`` (H.264,
yuv420p, the source frame rate) showing the head-mean attention of every frame.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from dino_train.data import IMAGE_EXTENSIONS
from dino_train.runtime.device import DeviceError, model_device, pick_device
from dino_train.runtime.files import CheckpointError, check_writable_dir
from dino_train.runtime.progress import use_progress_bar
from eval.attention import (
    AttentionSummary,
    apply_mask,
    colorize,
    denormalize,
    overlay,
    prepare_image,
    summarize,
    unwrap_vit,
    upsample,
    vit_patch_size,
)
from eval.attention_video import VIDEO_EXTENSIONS, VisualizeError, video_frames, write_attention_video
from eval.cli import HelpFormatter
from eval.common import add_backbone_args, backbone_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument("--input", required=True, type=Path, help="an image, a folder of images, or a video")
    p.add_argument("--video-frames", action="store_true", help="--input is a folder of video frames")
    p.add_argument("--output", required=True, type=Path, help="folder for the outputs")
    p.add_argument("--image-size", type=int, default=480, help="short side in pixels; 0 keeps the size")
    p.add_argument("--threshold", type=float, default=0.6, help="share of attention mass the masks keep")
    p.add_argument("--block", type=int, default=-1, help="transformer block (-1: the last)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--batch-size", type=int, default=8, help="video frames per forward pass")
    p.add_argument("--side-by-side", action="store_true", help="show the input beside the attention")
    p.add_argument("--apply-mask", action="store_true", help="videos: the masked frame, not the heat map")
    p.add_argument("--fps", type=float, help="output frame rate (default: the source's; 25 for frames)")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none off a terminal or under Slurm)"
    )
    args = p.parse_args(argv)
    if args.image_size < 0 or args.batch_size < 1 or not 0.0 <= args.threshold <= 1.0:
        p.error("need --image-size >= 0, --batch-size >= 1 and --threshold in [0, 1]")
    return args


def open_image(path: Path) -> Image.Image:
    """The image at ``path`` decoded to RGB; a VisualizeError naming the path when it is not one."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise VisualizeError(f"{path} is not a readable image ({type(err).__name__}: {err})") from err


def _to_numpy(rgb: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _panels(images: Tensor, s: AttentionSummary, p: int) -> dict[str, Tensor]:
    """Every picture of one image, keyed by file stem: (3, H, W) RGB in [0, 1] or (H, W) bool masks."""
    rgb = denormalize(images)[:1]
    heads, head_masks = upsample(s.heads[:1], p)[0], upsample(s.head_masks[:1], p)[0]
    maps = {f"head{i}": m for i, m in enumerate(heads)}
    masks = {f"head{i}": m for i, m in enumerate(head_masks)}
    maps["mean"], masks["mean"] = upsample(s.mean, p)[0, 0], upsample(s.mean_mask, p)[0, 0]
    out: dict[str, Tensor] = {"image": rgb[0]}
    for name in ["mean"] + [k for k in maps if k != "mean"]:
        heat = colorize(maps[name][None])
        out[f"attn-{name}"] = heat[0]
        out[f"mask-{name}"] = masks[name]
        out[f"overlay-attn-{name}"] = overlay(rgb, heat)[0]
        out[f"overlay-mask-{name}"] = apply_mask(rgb, masks[name][None])[0]
    return out


def _figure(panels: Sequence[dict[str, Tensor]]) -> Figure:
    """Two rows per image: image, mean attention, each head; then the mean mask on the image, the mean
    mask, each head's mask."""
    heads = sum(k.startswith("attn-head") for k in panels[0])
    h, w = panels[0]["image"].shape[-2:]
    cell = 1.8
    fig = Figure(figsize=(cell * (2 + heads) * max(w / h, 0.5), cell * 2 * len(panels)), layout="constrained")
    axes = fig.subplots(2 * len(panels), 2 + heads, squeeze=False)
    names = ["mean"] + [f"head{i}" for i in range(heads)]
    for n, pan in enumerate(panels):
        top, bottom = axes[2 * n], axes[2 * n + 1]
        top[0].imshow(_to_numpy(pan["image"]))
        bottom[0].imshow(_to_numpy(pan["overlay-mask-mean"]))
        for j, name in enumerate(names, start=1):
            top[j].imshow(_to_numpy(pan[f"attn-{name}"]))
            bottom[j].imshow(pan[f"mask-{name}"].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            if n == 0:
                top[j].set_title(name, fontsize=8)
        if n == 0:
            top[0].set_title("image", fontsize=8)
            bottom[0].set_title("mean mask", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig


def attention_figure(
    model: nn.Module, images: Sequence[Tensor], threshold: float = 0.6, block: int = -1
) -> Figure:
    """A matplotlib figure of the attention of each normalised (3, H, W) or (1, 3, H, W) image (sizes may
    differ; H and W multiples of the patch size): 2 rows per image."""
    p = vit_patch_size(model)
    panels = []
    for img in images:
        x = (img if img.ndim == 4 else img[None]).to(model_device(model))
        panels.append(_panels(x, summarize(model, x, threshold, block), p))
    return _figure(panels)


def write_attention_grid(
    model: nn.Module, image_paths: list[Path], out_path: Path, image_size: int | None, threshold: float = 0.6
) -> Path:
    """Save ``attention_figure`` of the images at ``image_paths`` (short side ``image_size``) as a PNG."""
    p = vit_patch_size(model)
    images = [prepare_image(open_image(Path(path)), image_size, p) for path in image_paths]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    attention_figure(model, images, threshold).savefig(out_path, dpi=100)
    return out_path


def write_image_outputs(
    model: nn.Module, image: Tensor, out_dir: Path, threshold: float, block: int, side_by_side: bool
) -> list[Path]:
    """All per-image files for one normalised (1, 3, H, W) image; returns their paths."""
    x = image.to(model_device(model))
    pan = _panels(x, summarize(model, x, threshold, block), vit_patch_size(model))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, t in pan.items():
        arr = t.cpu().numpy().astype(np.uint8) * 255 if t.dtype == torch.bool else _to_numpy(t)
        written.append(out_dir / f"{name}.png")
        Image.fromarray(arr).save(written[-1])
    if side_by_side:
        written.append(out_dir / "side-by-side.png")
        Image.fromarray(_to_numpy(torch.cat([pan["image"], pan["attn-mean"]], dim=-1))).save(written[-1])
    written.append(out_dir / "grid.png")
    _figure([pan]).savefig(written[-1], dpi=100)
    return written


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
    model, _ = backbone_from_args(args)
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
    try:
        run(args)
    except (VisualizeError, CheckpointError, DeviceError, ValueError, IndexError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
