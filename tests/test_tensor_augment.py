"""The batched tensor multi-crop path (data.augment_device=cpu|cuda) against the definitions it follows:
RandomResizedCrop's box, PIL's colour ops, the release's probabilities and order, and its wiring. Through
the loader, against the release's PIL path: tests/test_tensor_augment_sampling.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TVF

from dino_train.data import (
    MultiCropAugmentation,
    TensorMultiCrop,
    finish_crops,
)
from dino_train.data import color as C
from dino_train.data import photometric as P
from dino_train.data.loader import collate_raw_crops
from dino_train.data.tensor_augment import (
    CROP_RATIO,
    CROP_UNIFORMS,
    PHOTO_UNIFORMS,
    pil_to_uint8,
    random_resized_crop_box,
)
from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# One thread: these ops are small, and on a shared machine OpenMP's spinning threads make them far slower.
pytestmark = pytest.mark.usefixtures("one_thread")

LEVEL = 1 / 255  # one 8-bit level


@pytest.fixture(scope="module")
def photo(photos) -> Image.Image:
    return Image.open(photos[0]).convert("RGB")


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize(
    "hw, scale", [((375, 500), (0.4, 1.0)), ((375, 500), (0.05, 0.4)), ((300, 90), (0.4, 1.0))]
)
def test_crop_box_is_distributed_as_torchvision_draws_it(hw, scale):
    # (300, 90) is narrower than the ratio range: many tries fail and the centre fallback matters.
    n = 3000
    torch.manual_seed(0)
    image = torch.empty(3, *hw)
    theirs = np.array(
        [T.RandomResizedCrop.get_params(image, list(scale), list(CROP_RATIO)) for _ in range(n)]
    )
    ours = np.array([random_resized_crop_box(*hw, scale, u) for u in torch.rand(n, CROP_UNIFORMS).tolist()])
    # Two-sample KS at alpha = 0.001 (discrete values only make it stricter).
    critical = math.sqrt(-0.5 * math.log(0.001 / 2)) * math.sqrt(2 / n)
    area = lambda boxes: boxes[:, 2] * boxes[:, 3] / (hw[0] * hw[1])  # noqa: E731
    assert ks_statistic(area(ours), area(theirs)) < critical
    for col in range(4):  # top, left, h, w
        assert ks_statistic(ours[:, col], theirs[:, col]) < critical, col


def test_crop_box_fallback_and_positions_are_torchvision_exactly():
    # An area twice the image never fits: every draw takes RandomResizedCrop's centre fallback.
    for hw in ((300, 90), (90, 300), (100, 120)):
        theirs = T.RandomResizedCrop.get_params(torch.empty(3, *hw), [2.0, 2.0], list(CROP_RATIO))
        assert random_resized_crop_box(*hw, (2.0, 2.0), [0.5] * CROP_UNIFORMS) == tuple(theirs)
    # First try fits (area 1/4, ratio 1): 50 x 50 on 100 x 100, positions from 0 to 50 inclusive.
    u = [0.0, 0.5] + [0.9] * (CROP_UNIFORMS - 2)
    u[-2:] = [0.0, 1 - 1e-9]
    assert random_resized_crop_box(100, 100, (0.25, 0.25), u) == (0, 50, 50, 50)


# (name, ours on float [0, 1], PIL's on the image, max and mean allowed |difference| in 8-bit levels).
# PIL rounds to 8 bits after each op (<= 1 level); its hue goes through 8-bit HSV with the shift cut to
# 1/255 of a turn (up to ~9 levels at saturated edges, ~1.6 on average); its blur is three box blurs
# of the same variance as our Gaussian (<= 4 levels at edges).
COLOUR_CASES = [
    *[(f"brightness {f}", lambda x, f=f: C.adjust_brightness(x, torch.tensor([f])),
       lambda im, f=f: TVF.adjust_brightness(im, f), 1.5, 0.5) for f in (0.6, 1.4)],
    *[(f"contrast {f}", lambda x, f=f: C.adjust_contrast(x, torch.tensor([f])),
       lambda im, f=f: TVF.adjust_contrast(im, f), 1.5, 0.6) for f in (0.6, 1.4)],
    *[(f"saturation {f}", lambda x, f=f: C.adjust_saturation(x, torch.tensor([f])),
       lambda im, f=f: TVF.adjust_saturation(im, f), 1.5, 0.5) for f in (0.8, 1.2)],
    *[(f"hue {f}", lambda x, f=f: C.adjust_hue(x, torch.tensor([f])),
       lambda im, f=f: TVF.adjust_hue(im, f), 10.0, 2.0) for f in (-0.1, -0.03, 0.05, 0.1)],
    ("grayscale", lambda x: C.grayscale(x).expand_as(x), lambda im: TVF.rgb_to_grayscale(im, 3), 1.0, 0.3),
    *[(f"blur {s}", lambda x, s=s: P.gaussian_blur(x, torch.tensor([s])),
       lambda im, s=s: im.filter(ImageFilter.GaussianBlur(radius=s)), 5.0, 1.0)
      for s in (0.1, 0.5, 1.0, 2.0)],
    ("solarize", P.solarize, lambda im: ImageOps.solarize(im, 128), 0.01, 0.01),  # float rounding only
    *[(f"solarize at {t}", lambda x, t=t: P.solarize(x, t / 255), lambda im, t=t: ImageOps.solarize(im, t),
       0.01, 0.01) for t in (0, 64, 200)],
]  # fmt: skip


@pytest.mark.parametrize(
    "name, ours, pil, max_levels, mean_levels", COLOUR_CASES, ids=[c[0] for c in COLOUR_CASES]
)
def test_colour_op_matches_pil(photo, name, ours, pil, max_levels, mean_levels):
    x = pil_to_uint8(photo).float().div(255).unsqueeze(0)
    expected = pil_to_uint8(pil(photo)).float().div(255).unsqueeze(0)
    diff = (ours(x) - expected).abs() / LEVEL
    assert diff.max() <= max_levels + 1e-3 and diff.mean() <= mean_levels, (diff.max(), diff.mean())


def test_colour_ops_are_per_image_in_a_batch(photo):
    x = pil_to_uint8(photo).float().div(255)
    batch = torch.stack([x, x.flip(-1), x.roll(7, dims=-2)])
    f = torch.tensor([0.7, 1.3, 1.1])
    for op in (C.adjust_brightness, C.adjust_contrast, C.adjust_saturation):
        together = op(batch, f)
        alone = torch.cat([op(batch[i : i + 1], f[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(together, alone)
    together = C.adjust_hue(batch, f - 1.05)
    alone = torch.cat([C.adjust_hue(batch[i : i + 1], f[i : i + 1] - 1.05) for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_crops_are_pils_bicubic_resized_crops_of_the_drawn_boxes(photo):
    aug = TensorMultiCrop(48, (0.4, 1.0), 3, 24, (0.05, 0.4))
    torch.manual_seed(5)
    crops, _ = aug(photo)
    torch.manual_seed(5)
    u = torch.rand(aug.n_crops, CROP_UNIFORMS + PHOTO_UNIFORMS)[:, :CROP_UNIFORMS]
    for crop, row, size, scale in zip(crops, u.tolist(), aug.sizes, aug.scales, strict=True):
        box = random_resized_crop_box(photo.height, photo.width, scale, row)
        expected = pil_to_uint8(TVF.resized_crop(photo, *box, [size, size], T.InterpolationMode.BICUBIC))
        assert crop.dtype == torch.uint8 and crop.shape == (3, size, size)
        assert (crop.int() - expected.int()).abs().max() <= 1  # torch's antialiased bicubic vs PIL's


def test_parameter_rows_draw_the_releases_probabilities():
    n = 3000
    aug = TensorMultiCrop(16, (0.4, 1.0), 2, 8, (0.05, 0.4))
    image = Image.new("RGB", (20, 20), (120, 60, 200))
    torch.manual_seed(0)
    rows = torch.stack([aug(image)[1] for _ in range(n)])  # (n, 4 crops, N_PARAMS)

    def near(flags: torch.Tensor, p: float) -> bool:  # 5 binomial standard errors
        return abs(flags.float().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9

    for c in range(4):
        r = rows[:, c]
        assert near(r[:, P.P_FLIP], 0.5) and near(r[:, P.P_JITTER], 0.8) and near(r[:, P.P_GRAY], 0.2), c
        assert near(r[:, P.P_SIGMA] > 0, [1.0, 0.1, 0.5, 0.5][c]), c
        assert near(r[:, P.P_SOLARIZE], [0.0, 0.2, 0.0, 0.0][c]), c
    r = rows.reshape(-1, P.N_PARAMS)
    assert (r[:, P.P_SOLARIZE_AT] == 128 / 255).all()
    for col, lo, hi in ((P.P_BRIGHTNESS, 0.6, 1.4), (P.P_CONTRAST, 0.6, 1.4), (P.P_SATURATION, 0.8, 1.2),
                        (P.P_HUE, -0.1, 0.1)):  # fmt: skip
        v = r[:, col]
        assert lo <= v.min() and v.max() <= hi and abs(v.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)
    sigma = r[r[:, P.P_SIGMA] > 0, P.P_SIGMA]
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.03
    # ColorJitter's order: a uniformly random permutation of the 4 ops (chi-square, 23 dof, p ~ 1e-4).
    orders = [tuple(o) for o in r[:, P.P_ORDER : P.P_ORDER + 4].long().tolist()]
    counts = np.array([orders.count(p) for p in itertools.permutations(range(4))])
    expected = len(orders) / 24
    assert ((counts - expected) ** 2 / expected).sum() < 55


def test_solarisation_probabilities_and_threshold_are_settings():
    n = 2000
    aug = TensorMultiCrop(16, (0.4, 1.0), 2, 8, (0.05, 0.4), solarize_p=(0.5, 0.0, 0.3), solarize_threshold=0)
    image = Image.new("RGB", (20, 20), (120, 60, 200))
    torch.manual_seed(0)
    rows = torch.stack([aug(image)[1] for _ in range(n)])
    for c, p in enumerate((0.5, 0.0, 0.3, 0.3)):
        share = rows[:, c, P.P_SOLARIZE].mean().item()
        assert abs(share - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (c, share)
    assert (rows[..., P.P_SOLARIZE_AT] == 0).all()
    for build in (TensorMultiCrop, MultiCropAugmentation):
        for wrong in ((0.5, 0.5), (0.0, 0.2, 0.0, 0.0)):
            with pytest.raises(ValueError, match="solarize_p: expected 3 probabilities"):
                build(16, (0.4, 1.0), 2, 8, (0.05, 0.4), solarize_p=wrong)
    # Threshold 0 inverts the whole crop (a polarity inversion); each image keeps its own threshold.
    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    params = torch.stack([_row(P_SOLARIZE=1, P_SOLARIZE_AT=0.0), _row(), _row(P_SOLARIZE=1)])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = P.photometric(pixels, params) * std + mean
    torch.testing.assert_close(x[0], 1 - pixels[0] / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(x[1], pixels[1] / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(x[2], P.solarize(pixels[2:] / 255)[0], atol=1e-5, rtol=0)


def _row(**values: float) -> torch.Tensor:
    row = torch.zeros(P.N_PARAMS)
    row[P.P_BRIGHTNESS : P.P_SATURATION + 1] = 1.0
    row[P.P_SOLARIZE_AT] = P.SOLARIZE_THRESHOLD
    for name, v in values.items():
        row[getattr(P, name)] = v
    return row


def test_photometric_applies_each_rows_ops_in_the_releases_order(photo):
    x = pil_to_uint8(photo)[:, :64, :64]
    pixels = torch.stack([x, x.roll(11, dims=-1)])
    params = torch.stack(
        [
            _row(P_FLIP=1, P_JITTER=1, P_BRIGHTNESS=1.3, P_CONTRAST=0.7, P_SATURATION=1.2, P_HUE=0.05,
                 P_SIGMA=1.5, P_SOLARIZE=1),
            _row(P_JITTER=1, P_BRIGHTNESS=0.8, P_CONTRAST=1.3, P_SATURATION=0.9, P_HUE=-0.08, P_GRAY=1),
        ]
    )  # fmt: skip
    params[0, P.P_ORDER : P.P_ORDER + 4] = torch.tensor([3.0, 0, 2, 1])  # hue, brightness, saturation, ...
    params[1, P.P_ORDER : P.P_ORDER + 4] = torch.tensor([1.0, 2, 0, 3])
    got = P.photometric(pixels, params)

    f = lambda v: torch.tensor([v])  # noqa: E731
    a = pixels[:1].float() / 255
    a = C.adjust_hue(a.flip(-1), f(0.05))
    a = C.adjust_contrast(C.adjust_saturation(C.adjust_brightness(a, f(1.3)), f(1.2)), f(0.7))
    a = P.solarize(P.gaussian_blur(a, f(1.5)))
    b = pixels[1:].float() / 255
    b = C.adjust_saturation(C.adjust_contrast(b, f(1.3)), f(0.9))
    b = C.grayscale(C.adjust_hue(C.adjust_brightness(b, f(0.8)), f(-0.08))).expand_as(b)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(got, (torch.cat([a, b]) - mean) / std, atol=1e-5, rtol=1e-5)


def test_positions_of_one_size_finish_as_one_batch_with_the_same_result(photos):
    aug = TensorMultiCrop(32, (0.4, 1.0), 4, 16, (0.05, 0.4))
    torch.manual_seed(1)
    items = [(aug(Image.open(p).convert("RGB")), 0, 0) for p in photos[:4]]
    raw, _, _ = collate_raw_crops(items)
    grouped = finish_crops(raw)
    for r, g in zip(raw, grouped, strict=True):
        torch.testing.assert_close(g, P.photometric(r.pixels, r.params), atol=1e-6, rtol=1e-6)
    assert finish_crops(grouped)[0] is grouped[0]  # finished crops pass through
