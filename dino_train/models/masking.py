"""Blockwise random patch masks, as BEiT introduced and iBOT / dinov2 use for the masked-patch loss.

A mask covers the patch grid of one global crop with a few random rectangles; the masked tokens of the
student's input are replaced by a mask token, and the iBOT loss is taken at those positions. All
randomness comes from the ``torch.Generator`` passed in (no global RNG, no ``random``), so a seed gives
the same masks on any machine. Masks are bool, True = masked, built on the CPU.
"""

from __future__ import annotations

import math

import torch

MAX_FAILED_ATTEMPTS = 10  # BEiT's generator gives up after 10 attempts in a row that mask nothing new


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _randint(high_inclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator).item())


def place_block(
    mask: torch.Tensor,
    max_new: int,
    generator: torch.Generator,
    min_aspect: float = 0.3,
    min_block: int = 4,
) -> int:
    """One attempt at masking a random rectangle in ``mask`` (grid_h, grid_w) bool, in place.

    The rectangle's area is uniform between ``min_block`` and ``max_new`` patches and its aspect ratio
    h / w log-uniform in [min_aspect, 1 / min_aspect]; its position is uniform over the positions where
    it fits. It is kept only if it masks between 1 and ``max_new`` patches not masked before (it may
    overlap earlier blocks). Returns the number of newly masked patches (0 when the attempt failed).
    """
    grid_h, grid_w = mask.shape
    area = _uniform(min(min_block, max_new), max(min_block, max_new), generator)
    aspect = math.exp(_uniform(math.log(min_aspect), -math.log(min_aspect), generator))
    h = max(1, round(math.sqrt(area * aspect)))
    w = max(1, round(math.sqrt(area / aspect)))
    if h > grid_h or w > grid_w:
        return 0
    top, left = _randint(grid_h - h, generator), _randint(grid_w - w, generator)
    window = mask[top : top + h, left : left + w]
    new = int((~window).sum())
    if not 0 < new <= max_new:
        return 0
    window.fill_(True)
    return new


def block_mask(
    grid_h: int,
    grid_w: int,
    num_masked: int,
    generator: torch.Generator,
    min_aspect: float = 0.3,
    min_block: int = 4,
) -> torch.Tensor:
    """A (grid_h, grid_w) bool mask of at most ``num_masked`` patches, made of random rectangles.

    Rectangles (``place_block``) are added, each masking no more than the patches still to mask, until
    ``num_masked`` are masked or 10 attempts in a row mask nothing, so the count is at most
    ``num_masked`` and usually equal to it.
    """
    if not 0 <= num_masked <= grid_h * grid_w:
        raise ValueError(f"num_masked={num_masked} is not within the {grid_h}x{grid_w} grid")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    count, failures = 0, 0
    while count < num_masked and failures < MAX_FAILED_ATTEMPTS:
        new = place_block(mask, num_masked - count, generator, min_aspect, min_block)
        count += new
        failures = 0 if new else failures + 1
    return mask


def sample_masks(
    batch: int,
    grid_h: int,
    grid_w: int,
    mask_ratio_range: tuple[float, float],
    mask_probability: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Masks for a batch of crops, as dinov2's collate makes them: (batch, grid_h * grid_w) bool.

    round(batch * mask_probability) images (Python's round) are masked; the range of mask ratios
    [low, high] is cut into that many equal intervals by a linspace, and the i-th masked image draws
    its ratio uniformly in the i-th interval (so the ratios cover the range evenly), masking
    int(ratio * grid_h * grid_w) patches at most (``block_mask``). The other images have no mask. The
    images are then put in a random order. Rows are the flattened grid, row-major.
    """
    low, high = mask_ratio_range
    if not 0 <= low <= high <= 1:
        raise ValueError(f"mask_ratio_range must satisfy 0 <= low <= high <= 1, got {mask_ratio_range}")
    if not 0 <= mask_probability <= 1:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    n_patches = grid_h * grid_w
    n_masked = round(batch * mask_probability)
    edges = torch.linspace(low, high, n_masked + 1, dtype=torch.float64).tolist()
    masks = torch.zeros(batch, n_patches, dtype=torch.bool)
    for i in range(n_masked):
        ratio = _uniform(edges[i], edges[i + 1], generator)
        masks[i] = block_mask(grid_h, grid_w, int(n_patches * ratio), generator).flatten()
    return masks[torch.randperm(batch, generator=generator)]
