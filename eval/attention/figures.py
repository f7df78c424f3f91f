"""Attention pictures of a ViT: the per-image panels (each head's map and 60%-mass mask, their overlays),
the two-rows-per-image figure, and the files that ``visualize_attention``, ``eval_attention`` and the
demo write."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from dino_train.measure.attention import (
    AttentionSummary,
    apply_mask,
    colorize,
    denormalize,
    overlay,
    prepare_image,
    summarize,
    upsample,
    vit_patch_size,
)
from dino_train.runtime.device import model_device
from eval.attention.video import VisualizeError


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
