"""The tensor multi-crop path through the loader: its crops distributed as the release's PIL path's, JPEGs
decoded at reduced size only when the crops allow, and samples seeded per (seed, epoch, index) whatever
the worker."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from bench.data_pipeline import make_jpegs
from dino_train.data import (
    MultiCropAugmentation,
    MultiCropDataset,
    TensorMultiCrop,
    build_tensor_pretrain_loader,
    finish_crops,
)
from dino_train.data.loader import collate_raw_crops
from dino_train.data.tensor_augment import (
    DraftImageDataset,
    draft_size,
    load_rgb_draft,
)
from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("one_thread")

LEVEL = 1 / 255  # one 8-bit level


def _crop_statistics(crops: torch.Tensor) -> torch.Tensor:
    """Normalised crops (N, 3, S, S) -> per crop (N, 8): channel means and stds, mean |horizontal
    gradient| (sharpness: crop scale and blur) and mean channel spread (saturation) in [0, 1] pixels."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = crops * std + mean
    grad = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
    spread = (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2))
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), grad[:, None], spread[:, None]], dim=1)


# The release's solarisation, and inversion (threshold 0) with other probabilities per crop kind.
SOLARIZATIONS = [((0.0, 0.2, 0.0), 128), ((1.0, 0.0, 0.5), 0)]


@pytest.mark.parametrize("solarize_p, threshold", SOLARIZATIONS)
def test_tensor_path_crops_are_distributed_as_the_pil_paths(photos, solarize_p, threshold):
    images = [Image.open(p).convert("RGB") for p in photos]
    shape = (48, (0.4, 1.0), 2, 24, (0.05, 0.4), solarize_p, threshold)
    pil, tensor = MultiCropAugmentation(*shape), TensorMultiCrop(*shape)
    draws = 50
    torch.manual_seed(0)
    pil_crops = [pil(im) for im in images for _ in range(draws)]  # 400 samples x [g1, g2, l1, l2]
    items = [(tensor(im), 0, 0) for im in images for _ in range(draws)]
    tensor_crops = finish_crops(collate_raw_crops(items)[0])
    for c, name in enumerate(("global 1", "global 2", "local 1", "local 2")):
        ours = _crop_statistics(tensor_crops[c])
        theirs = _crop_statistics(torch.stack([s[c] for s in pil_crops]))
        se = torch.sqrt(ours.var(dim=0) / len(ours) + theirs.var(dim=0) / len(theirs))
        # Means within 4.5 standard errors plus one level (PIL's 8-bit rounding between ops); the
        # spread of each statistic over draws within 25%.
        gap = (ours.mean(dim=0) - theirs.mean(dim=0)).abs()
        assert (gap <= 4.5 * se + LEVEL).all(), (name, gap, se)
        ratio = ours.std(dim=0) / theirs.std(dim=0)
        assert ((ratio > 0.8) & (ratio < 1.25)).all(), (name, ratio)


def test_jpegs_decode_at_reduced_size_only_when_the_crops_allow(tmp_path):
    big = make_jpegs(tmp_path, 1, size=(1000, 760))[0]
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    assert load_rgb_draft(big, 180).size == (250, 190)  # 1/4: the short side stays >= 180
    assert load_rgb_draft(big, 400).size == (1000, 760)  # 1/2 would be 380 < 400
    assert load_rgb_draft(png, 180).size == (1000, 760)  # draft is JPEG's alone
    assert draft_size((500, 375), 224) is None and draft_size((1000, 760), 180) == (237, 180)


def test_samples_are_seeded_per_epoch_and_index_whatever_the_worker(photos, tmp_path):
    folder = photos[0].parent
    aug = TensorMultiCrop(32, (0.4, 1.0), 2, 16, (0.05, 0.4))
    ds = MultiCropDataset(DraftImageDataset(folder, aug.min_short_side), aug, seed=3)
    torch.manual_seed(9)
    state = torch.get_rng_state()
    (a, pa), _, _ = ds[(2, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    (b, pb), _, _ = ds[(2, 0)]
    (c, pc), _, _ = ds[(2, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and torch.equal(pa, pb)
    assert not torch.equal(pa, pc)
    batches = {}
    for on_device, workers in ((False, 0), (False, 2), (True, 0)):
        loader, sampler = build_tensor_pretrain_loader(
            str(folder), aug, 4, workers, 3, 0, 1, False, on_device
        )
        sampler.set_epoch(1)
        batches[on_device, workers] = [finish_crops(crops) for crops, _, _ in loader]
    assert len(batches[False, 0]) == 2
    for other in (batches[False, 2], batches[True, 0]):
        for x, y in zip(batches[False, 0], other, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))
