"""iBOT's blockwise masks (dino_train.models.masking): the masked count against its target, one block a
rectangle, reproducible from its generator, and the ratios and shuffling of sample_masks."""

from __future__ import annotations

import pytest
import torch

from dino_train.models.masking import block_mask, place_block, sample_masks

# ---------------------------------------------------------------- masks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_masked", [10, 40, 98])
def test_block_mask_count_is_close_to_and_never_above_the_target(num_masked):
    for seed in range(20):
        mask = block_mask(14, 14, num_masked, _gen(seed))
        assert mask.shape == (14, 14) and mask.dtype == torch.bool
        assert 0.5 * num_masked < int(mask.sum()) <= num_masked


def test_one_block_is_a_rectangle():
    placed = 0
    for seed in range(30):
        mask = torch.zeros(14, 14, dtype=torch.bool)
        new = place_block(mask, 30, _gen(seed))
        assert int(mask.sum()) == new <= 30
        if new:
            placed += 1
            rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
            box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all() and box.numel() == new
    assert placed > 15


def test_block_mask_is_reproducible_from_its_generator():
    a, b = block_mask(14, 14, 60, _gen(7)), block_mask(14, 14, 60, _gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, block_mask(14, 14, 60, _gen(8)))
    assert not block_mask(14, 14, 0, _gen(7)).any()
    with pytest.raises(ValueError, match="num_masked"):
        block_mask(4, 4, 17, _gen(7))


@pytest.mark.parametrize("batch, probability", [(10, 0.5), (5, 0.3), (8, 1.0), (6, 0.0)])
def test_sample_masks_masks_round_b_p_images_with_ratios_in_range(batch, probability):
    n = 14 * 14
    low, high = 0.1, 0.5
    masks = sample_masks(batch, 14, 14, (low, high), probability, _gen(9))
    assert masks.shape == (batch, n) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    masked = counts[counts > 0]
    assert len(masked) == round(batch * probability)
    assert (masked <= int(n * high)).all() and (masked >= 0.5 * n * low).all()


def test_sample_masks_spreads_ratios_and_shuffles_reproducibly():
    masks = sample_masks(32, 16, 16, (0.1, 0.5), 1.0, _gen(10))
    # Each image draws its ratio in its own 1/32 of [0.1, 0.5]: the i-th smallest fraction masked lies in
    # the i-th interval (the mask may fall a patch or two short of its target, never above it).
    fractions = (masks.sum(dim=1).float() / 256).sort().values
    edges = torch.linspace(0.1, 0.5, 33)
    assert (fractions <= edges[1:] + 1e-6).all() and (fractions >= edges[:-1] - 2 / 256).all()
    assert torch.equal(masks, sample_masks(32, 16, 16, (0.1, 0.5), 1.0, _gen(10)))
    # The masked images are not always the first ones.
    firsts = [sample_masks(8, 14, 14, (0.1, 0.5), 0.5, _gen(s))[:4].any(dim=1).all().item() for s in range(6)]
    assert not all(firsts)
