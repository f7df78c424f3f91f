"""Gram anchoring (DINOv3, Simeoni et al. 2025, "DINOv3", section 4): a loss on the patch features alone.

For each image, X is the (N, D) matrix of its N patch features, each row L2-normalised; X X^T is the (N, N)
matrix of cosine similarities between its patches (the Gram matrix). The loss pulls the student's Gram
matrix towards the Gram teacher's, ||X_S X_S^T - X_G X_G^T||_F^2, which constrains how patches relate to
one another and not the features themselves: the student keeps learning its global objective while the
structure of its dense features stays that of an earlier, cleaner teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_matrix(patches: torch.Tensor) -> torch.Tensor:
    """(B, N, D) patch features -> (B, N, N) cosine similarities between each image's patches (float32)."""
    if patches.ndim != 3:
        raise ValueError(f"gram_matrix needs (B, N, D) patch features, got shape {tuple(patches.shape)}")
    x = F.normalize(patches.float(), dim=-1)
    return x @ x.transpose(1, 2)


def gram_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The squared Frobenius distance between the two Gram matrices, as a mean over their B * N * N
    entries (so that its size does not depend on the crop size); student and teacher (B, N, D), the
    same images in the same order. The teacher's side carries no gradient."""
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"gram_loss: student patches {tuple(student.shape)} and Gram teacher patches "
            f"{tuple(teacher.shape)} differ in images or patches"
        )
    with torch.no_grad():
        target = gram_matrix(teacher)
    return (gram_matrix(student) - target).square().mean()


def resize_patch_grid(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) patch features laid out on an (h, w) ``grid`` -> (B, H*W, D) on the grid ``size``
    (H, W), by bicubic interpolation of each feature channel (DINOv3's high-resolution Gram teacher sees
    images twice as large and is brought down to the student's grid this way)."""
    b, n, d = patches.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"resize_patch_grid: {n} patches do not fill a {h} x {w} grid")
    if (h, w) == tuple(size):
        return patches
    maps = patches.transpose(1, 2).reshape(b, d, h, w).float()
    out = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)
    return out.flatten(2).transpose(1, 2).to(patches.dtype)
