"""The attention-segmentation measures (dino_train.measure.jaccard, eval_attention): the Jaccard
index by hand, the pixel alignment of the patch masks with the object masks, and the tool end to end on
the embedded set's val images and their object masks."""

import json
from dataclasses import replace
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
    PAPER_RULE,
    PRIOR,
    JaccardResult,
    ObjectScore,
    attention_jaccard,
    folder_jaccard,
    jaccard,
    object_is_brighter,
    reference_jaccards,
)
from dino_train.measure.masks import load_masked_images
from dino_train.models import build_backbone
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
    """The paper's rule apart by object (its best head's score), the head-mean mask's apart by image."""
    objects = [
        ObjectScore(0, 1, 60.0, 0, True),
        ObjectScore(1, 1, 4.0, 2, False),
        ObjectScore(2, 5, 50.0, 1, True),
    ]
    res = JaccardResult(38.0, 0.0, [], 0.0, 3, 3, per_object=objects)
    assert res.by_brightness() == pytest.approx({BRIGHTER: 55.0, DARKER: 4.0})
    assert res.as_dict()["by_brightness_objects"] == {BRIGHTER: 2, DARKER: 1}
    res.per_object = [replace(o, brighter=True) for o in objects]  # a group without objects is left out
    assert res.by_brightness() == pytest.approx({BRIGHTER: 38.0})
    res.per_object = [replace(o, brighter=b) for o, b in zip(objects, [None, False, True], strict=True)]
    assert res.by_brightness() == pytest.approx({BRIGHTER: 50.0, DARKER: 4.0})  # None: in neither group
    assert res.as_dict()["by_brightness_objects"] == {BRIGHTER: 1, DARKER: 1}
    res.per_image, res.object_brighter = [70.0, 10.0, 30.0], [True, False, True]
    assert res.head_mean_by_brightness() == pytest.approx({BRIGHTER: 50.0, DARKER: 10.0})


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
    """An image without an object has nothing to score under the paper's rule (for each object, ...):
    it is left out, as the model's own score leaves it out; with one image there are no other masks, so
    no prior."""
    empty = torch.zeros(16, 16, dtype=torch.bool)
    full = torch.ones(16, 16, dtype=torch.bool)
    assert reference_jaccards([empty], 8) == {EVEN: 0.0}
    # Two images: the empty one is left out; 60% of the full one's four patches keeps three (75), for
    # even attention and for the prior (the empty mask's map spreads evenly).
    refs = reference_jaccards([empty, full], 8)
    assert refs[EVEN] == pytest.approx(75.0) and refs[PRIOR] == pytest.approx(75.0)


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
    assert attention_jaccard(vit, [img], [own]).head_mean_mask == pytest.approx(100.0)
    assert attention_jaccard(vit, [img], [~own]).head_mean_mask == pytest.approx(0.0)
    both = attention_jaccard(vit, [img, img], [own, ~own])  # per image, in input order
    assert both.per_image == pytest.approx([100.0, 0.0]) and both.head_mean_mask == pytest.approx(50.0)
    # Each head's own mask as the object: the paper's rule picks that head, and scores it 100.
    heads = upsample(summarize(vit, img).head_masks, 8)[0].bool()
    for h, mask in enumerate(heads):
        one = attention_jaccard(vit, [img], [mask])
        assert one.best_head_per_object == pytest.approx(100.0) and one.per_object[0].head == h
    assert len(both.per_image_heads) == 2 and all(len(h) == 3 for h in both.per_image_heads)
    with pytest.raises(ValueError, match="as many masks as images"):
        attention_jaccard(vit, [img], [])


@pytest.mark.slow
def test_eval_attention_end_to_end(tiny_data, backbone_file, tmp_path, capsys):
    images, masks = tiny_data / "val", tiny_data / "val_masks"
    n_masks = len(list(masks.rglob("*.png")))
    assert n_masks > 0
    args = ["--checkpoint", str(backbone_file), "--images", str(images), "--masks", str(masks)]
    assert attention_eval.main([*args, "--output-dir", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "attention_jaccard.json").read_text())
    assert res["images"] == n_masks  # only the images with a mask (the shape classes) are scored
    assert len(res["per_head"]) == 3 and res["best_single_head"] == max(res["per_head"])
    assert 0.0 <= res["head_mean_mask"] <= 100.0 and res["threshold"] == 0.6
    assert res["objects"] == n_masks  # one object per mask in the embedded set
    # The paper's rule: at least the best single head's average, as each object takes its best head.
    assert res["best_single_head"] <= res["best_head_per_object"] <= 100.0
    vit, _ = load_backbone(str(backbone_file))
    again = folder_jaccard(vit.eval(), images, masks)
    assert again.head_mean_mask == pytest.approx(res["head_mean_mask"])
    assert again.best_head_per_object == pytest.approx(res["best_head_per_object"])
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
    assert sum(r["head_mean_mask"] for r in rows) / n_masks == pytest.approx(res["head_mean_mask"])
    assert sum(r["best_head_per_object"] for r in rows) / n_masks == pytest.approx(
        res["best_head_per_object"]
    )
    for r in rows:  # one object each: the image's score is its object's, the best of the heads' scores
        (obj,) = r["objects"]
        assert r["best_head_per_object"] == obj["jaccard"] == pytest.approx(max(r["per_head"]))
    for h, head_mean in enumerate(res["per_head"]):
        assert sum(r["per_head"][h] for r in rows) / n_masks == pytest.approx(head_mean)
    # Whether each object is the brighter region, checked on the files themselves (PIL's luma).
    for r in rows:
        luma = np.asarray(Image.open(images / r["image"]).convert("L"), dtype=float)
        inside = np.asarray(Image.open(masks / r["mask"]).convert("L")) > 127
        assert r["object_brighter"] == bool(luma[inside].mean() > luma[~inside].mean()), r
        assert r["objects"][0]["object_brighter"] == r["object_brighter"]
    groups = {
        True: [r["best_head_per_object"] for r in rows if r["object_brighter"]],
        False: [r["best_head_per_object"] for r in rows if not r["object_brighter"]],
    }
    assert all(groups.values())  # the embedded set draws either polarity
    assert res["by_brightness"] == pytest.approx(
        {BRIGHTER: sum(groups[True]) / len(groups[True]), DARKER: sum(groups[False]) / len(groups[False])}
    )
    printed = capsys.readouterr().out
    assert "attention Jaccard on" in printed and "no model: the other masks' mean" in printed
    table = [line.strip() for line in printed.splitlines()]
    assert table.index(next(t for t in table if t.startswith("mask from"))) + 2 == table.index(
        next(t for t in table if t.startswith(PAPER_RULE))
    )  # the paper's rule is the first row
    assert f"{BRIGHTER} ({len(groups[True])} objects)" in printed
    assert f"{DARKER} ({len(groups[False])} objects)" in printed
    assert res["by_brightness_objects"] == {BRIGHTER: len(groups[True]), DARKER: len(groups[False])}
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


def test_the_demos_grid_and_the_measure_read_a_version_2_set(tmp_path):
    """Version 2 masks every val image (label maps, one id per object): the grid takes its first four
    classes in the generator's order, and the paper's rule scores every object of every class."""
    from dino_train.data.embedded import MASKS, classes_for, generate_embedded_dataset
    from launch.demo import grid_images

    root = generate_embedded_dataset(tmp_path / "v2", train_per_class=1, val_per_class=3, version=2)
    picked = grid_images(root)
    assert [p.parent.name for p in picked] == list(classes_for(2)[:4])
    images, masks = load_masked_images(root / "val", root / MASKS, 16)
    assert len(images) == 3 * len(classes_for(2))
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=16, img_size=64).eval()
    res = attention_jaccard(vit, images, masks)
    assert res.objects >= len(images) and len(res.per_object) == res.objects
    assert all(o.object_id in (1, 2) for o in res.per_object)


def test_a_mask_of_another_size_than_its_image_is_named(tiny_data, tmp_path):
    image = next((tiny_data / "val").rglob("*.png"))
    (tmp_path / "img").mkdir(), (tmp_path / "msk").mkdir()
    Image.open(image).save(tmp_path / "img" / "a.png")
    w, h = Image.open(image).size
    Image.fromarray(np.ones((h + 8, w), np.uint8)).save(tmp_path / "msk" / "a.png")
    with pytest.raises(ValueError, match=f"a.png is {w}x{h + 8} but its image .*a.png is {w}x{h}"):
        load_masked_images(tmp_path / "img", tmp_path / "msk", 8)
