"""The paper's attention-segmentation measure (eval/attention_jaccard.py, eval_attention): the Jaccard
index by hand, the pixel alignment of the patch masks with the object masks, and the tool end to end on
the embedded set's val images and their object masks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_train.measure.attention import summarize, upsample
from dino_train.measure.jaccard import (
    BRIGHTER,
    DARKER,
    EVEN,
    PRIOR,
    JaccardResult,
    attention_jaccard,
    folder_jaccard,
    jaccard,
    load_masked_images,
    object_is_brighter,
    reference_jaccards,
)
from dino_train.models.loading import load_backbone
from eval.attention import cli as attention_eval
from eval.common import EvalExit


def test_jaccard_by_hand():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2, :2] = True  # 4 pixels
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[0] = True  # the top row: 2 shared pixels, 6 in the union
    assert jaccard(a, b).item() == pytest.approx(2 / 6)
    assert jaccard(a, a).item() == 1.0 and jaccard(a, ~a).item() == 0.0
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert jaccard(empty, empty).item() == 1.0  # nothing to find, nothing found
    stacked = jaccard(torch.stack([a, b]), b)  # leading dims are kept: (2,)
    assert stacked.shape == (2,) and stacked.tolist() == pytest.approx([2 / 6, 1.0])


def _box(h: int, w: int, rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[rows, cols] = True
    return m


def _normalised(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((rgb - mean) / std)[None]


def test_object_brightness_by_hand():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:12, 4:12] = True
    light_object = torch.where(mask, 0.9, 0.2).expand(3, 16, 16)
    assert object_is_brighter(_normalised(light_object), mask) is True
    assert object_is_brighter(_normalised(1.0 - light_object), mask) is False
    # Luma, not the channel sum: a green object (0.6 green: luma 0.35, sum 0.6) on a red-blue field
    # (0.5 red, 1.0 blue: luma 0.26, sum 1.5) is the brighter one.
    field = (~mask).float()
    green_on_purple = torch.stack([0.5 * field, 0.6 * mask.float(), field])
    assert object_is_brighter(_normalised(green_on_purple), mask) is True
    for nothing_to_compare in (torch.zeros_like(mask), torch.ones_like(mask)):
        assert object_is_brighter(_normalised(light_object), nothing_to_compare) is None


def test_jaccard_by_brightness_by_hand():
    res = JaccardResult(0.0, [], 0.0, 3, per_image=[60.0, 4.0, 50.0], object_brighter=[True, False, True])
    assert res.by_brightness() == pytest.approx({BRIGHTER: 55.0, DARKER: 4.0})
    assert res.as_dict()["by_brightness_images"] == {BRIGHTER: 2, DARKER: 1}
    res.object_brighter = [True, True, True]  # a group without images is left out
    assert res.by_brightness() == pytest.approx({BRIGHTER: 38.0})
    res.object_brighter = [None, False, True]  # an empty or full mask: in neither group
    assert res.by_brightness() == pytest.approx({BRIGHTER: 50.0, DARKER: 4.0})
    assert res.as_dict()["by_brightness_images"] == {BRIGHTER: 1, DARKER: 1}


def test_reference_jaccards_by_hand():
    """Patches of 8 px. Two masks on opposite patches: attention even on each object keeps exactly its
    patch (100), and the other mask's map keeps the opposite patch (0). Equal masks: the prior is the
    object itself (100). A taller image takes the prior resized to its own shape."""
    top_left = _box(16, 16, slice(0, 8), slice(0, 8))
    bottom_right = _box(16, 16, slice(8, 16), slice(8, 16))
    refs = reference_jaccards([top_left, bottom_right], 8)
    assert refs[EVEN] == pytest.approx(100.0) and refs[PRIOR] == pytest.approx(0.0)
    assert reference_jaccards([top_left, top_left], 8)[PRIOR] == pytest.approx(100.0)
    # (32, 16): the other mask's top-left quadrant becomes rows 0-15, columns 0-7 there, two patches of
    # equal weight, both kept; this mask is exactly them.
    tall = _box(32, 16, slice(0, 16), slice(0, 8))
    assert reference_jaccards([top_left, tall], 8)[PRIOR] == pytest.approx(100.0)
    # Half of one patch: even attention keeps that patch, twice the object (Jaccard 1/2).
    half = _box(16, 16, slice(0, 4), slice(0, 8))
    assert reference_jaccards([half], 8)[EVEN] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="at least one mask"):
        reference_jaccards([], 8)
    with pytest.raises(ValueError, match=r"multiples of 8; got \(16, 12\)"):
        reference_jaccards([torch.ones(16, 12, dtype=torch.bool)], 8)


def test_reference_jaccards_of_an_empty_mask_and_of_one_image():
    """An image without its object scores 0 for even attention, as any model's attention does (it always
    keeps some patch), not the 100 of two empty masks; with one image there are no other masks, so no
    prior."""
    empty = torch.zeros(16, 16, dtype=torch.bool)
    full = torch.ones(16, 16, dtype=torch.bool)
    assert reference_jaccards([empty], 8) == {EVEN: 0.0}
    # Two images: even attention scores 0 on the empty one, 60% of the full one's four patches
    # (three patches of the four: 75) on the other.
    refs = reference_jaccards([empty, full], 8)
    assert refs[EVEN] == pytest.approx(75.0 / 2) and refs[PRIOR] == pytest.approx(75.0 / 2)


@pytest.fixture(scope="module")
def vit(backbone_file):
    model, _ = load_backbone(str(backbone_file))
    return model.eval()


def test_the_attention_masks_own_pixels_score_100_and_their_complement_0(vit):
    """Target = the head-mean 60% mask itself, upsampled to pixels: the measure must give exactly 100
    (and 0 for its complement), which fails if patch masks and pixel masks were misaligned."""
    torch.manual_seed(0)
    img = torch.randn(1, 3, 32, 40)  # 4 x 5 patches of 8 px: not square, to catch a transposed grid
    own = upsample(summarize(vit, img).mean_mask, 8)[0, 0].bool()
    assert 0 < own.sum() < own.numel()
    assert attention_jaccard(vit, [img], [own]).mean == pytest.approx(100.0)
    assert attention_jaccard(vit, [img], [~own]).mean == pytest.approx(0.0)
    both = attention_jaccard(vit, [img, img], [own, ~own])  # per image, in input order
    assert both.per_image == pytest.approx([100.0, 0.0]) and both.mean == pytest.approx(50.0)
    assert len(both.per_image_heads) == 2 and all(len(h) == 3 for h in both.per_image_heads)
    with pytest.raises(ValueError, match="as many masks as images"):
        attention_jaccard(vit, [img], [])


def test_eval_attention_end_to_end(tiny_data, backbone_file, tmp_path, capsys):
    images, masks = tiny_data / "val", tiny_data / "val_masks"
    n_masks = len(list(masks.rglob("*.png")))
    assert n_masks > 0
    args = ["--checkpoint", str(backbone_file), "--images", str(images), "--masks", str(masks)]
    assert attention_eval.main([*args, "--output-dir", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "attention_jaccard.json").read_text())
    assert res["images"] == n_masks  # only the images with a mask (the shape classes) are scored
    assert len(res["per_head"]) == 3 and res["best_head"] == max(res["per_head"])
    assert 0.0 <= res["mean"] <= 100.0 and res["threshold"] == 0.6
    vit, _ = load_backbone(str(backbone_file))
    assert folder_jaccard(vit.eval(), images, masks).mean == pytest.approx(res["mean"])
    _, loaded = load_masked_images(images, masks, 8)
    assert res["references"] == pytest.approx(reference_jaccards(loaded, 8))
    assert (tmp_path / "out" / "attention_jaccard.png").stat().st_size > 0
    # Each image's own scores, named by its path: they average to the reported numbers.
    rows = res["per_image"]
    assert len(rows) == n_masks and sorted(r["mask"] for r in rows) == sorted(
        str(m.relative_to(masks)) for m in masks.rglob("*.png")
    )
    for r in rows:
        assert (images / r["image"]).is_file() and Path(r["image"]).stem == Path(r["mask"]).stem
    assert sum(r["mean"] for r in rows) / n_masks == pytest.approx(res["mean"])
    for h, head_mean in enumerate(res["per_head"]):
        assert sum(r["per_head"][h] for r in rows) / n_masks == pytest.approx(head_mean)
    # Whether each object is the brighter region, checked on the files themselves (PIL's luma).
    for r in rows:
        luma = np.asarray(Image.open(images / r["image"]).convert("L"), dtype=float)
        inside = np.asarray(Image.open(masks / r["mask"]).convert("L")) > 127
        assert r["object_brighter"] == bool(luma[inside].mean() > luma[~inside].mean()), r
    groups = {
        True: [r["mean"] for r in rows if r["object_brighter"]],
        False: [r["mean"] for r in rows if not r["object_brighter"]],
    }
    assert all(groups.values())  # the embedded set draws either polarity
    assert res["by_brightness"] == pytest.approx(
        {BRIGHTER: sum(groups[True]) / len(groups[True]), DARKER: sum(groups[False]) / len(groups[False])}
    )
    printed = capsys.readouterr().out
    assert "attention Jaccard on" in printed and "no model: the other masks' mean" in printed
    assert f"mean of heads, {BRIGHTER} ({len(groups[True])})" in printed
    assert f"mean of heads, {DARKER} ({len(groups[False])})" in printed
    assert res["by_brightness_images"] == {BRIGHTER: len(groups[True]), DARKER: len(groups[False])}
    assert set(res["references"]) == {PRIOR, EVEN} == {"masks_mean", "even_on_object"}
    # A masks folder that matches no image is an input error (exit 2) naming both folders.
    (tmp_path / "none").mkdir()
    with pytest.raises(EvalExit) as stop:
        attention_eval.main([*args[:4], "--masks", str(tmp_path / "none")])
    assert stop.value.code == 2
    assert "has a mask at the same relative path" in capsys.readouterr().err


def test_the_attention_grid_shows_darker_and_brighter_objects(tiny_data):
    """The grid's images alternate objects darker and brighter than their background (the data draws both,
    and a teacher may light only one kind); polarity checked here on the files' own luma."""
    from dino_train.data.embedded import MASKS, SHAPE_CLASSES
    from launch.demo import grid_images

    def brighter(img: Path) -> bool:
        luma = np.asarray(Image.open(img).convert("L"), dtype=float)
        inside = np.asarray(Image.open(tiny_data / MASKS / img.parent.name / img.name).convert("L")) > 127
        return bool(luma[inside].mean() > luma[~inside].mean())

    picked = grid_images(tiny_data)
    assert [p.parent.name for p in picked] == list(SHAPE_CLASSES[:4])
    for i, img in enumerate(picked):
        want = i % 2 == 1
        candidates = sorted((tiny_data / "val" / img.parent.name).glob("*.png"))
        if any(brighter(c) == want for c in candidates):
            assert brighter(img) == want, (i, img)
        else:  # no image of the wanted kind in this class: its first image
            assert img == candidates[0]
