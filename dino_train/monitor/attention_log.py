"""Attention maps in TensorBoard during training: each image beside its head-mean CLS attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eval.attention import colorize, denormalize, summarize, upsample, vit_patch_size


def attention_panels(model: nn.Module, images: Tensor, block: int = -1) -> Tensor:
    """Normalised (B, 3, H, W) images -> (B, 3, H, 2W) RGB in [0, 1]: the image, then its head-mean CLS
    attention (nearest-upsampled, inferno). H and W must be multiples of the patch size."""
    s = summarize(model, images, block=block)
    heat = colorize(upsample(s.mean, vit_patch_size(model))[:, 0])
    return torch.cat([denormalize(images), heat], dim=-1)


def fixed_images(folder: str | Path, size: int, limit: int = 4) -> Tensor:
    """Up to ``limit`` images of ``folder`` (class folders or flat), resized and centre-cropped to ``size``
    (a multiple of the patch size) and normalised: (B, 3, size, size). The same images every call."""
    from dino_train.data import ImageDataset, eval_transform

    ds = ImageDataset(folder, eval_transform(size, size))
    step = max(len(ds) // limit, 1)  # spread over the classes rather than the first few files
    return torch.stack([ds[i][0] for i in range(0, len(ds), step)][:limit])


def log_attention_to_tensorboard(
    writer: Any, model: nn.Module, images: Tensor, step: int, tag: str = "attention"
) -> None:
    """Add ``tag/<i>`` images (3, H, 2W) for each of the (B, 3, H, W) ``images`` to a SummaryWriter.

    ``model`` may be the backbone, the multi-crop wrapper or its DDP wrapper; it is run in eval mode (drop
    path off) without gradients and left in the mode it was in. Images are moved to the model's device.
    """
    device = next(model.parameters()).device
    panels = attention_panels(model, images.to(device)).cpu()
    for i, panel in enumerate(panels):
        writer.add_image(f"{tag}/{i}", panel, global_step=step, dataformats="CHW")
