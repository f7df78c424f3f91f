"""The paper's attention-Jaccard rule (for each object the best head's 60% mask; the mean over an image's
objects, then over images) by hand, against the head-mean mask on a case where the two differ, and the
mask files it reads as label maps (one id per object, VOC's void border, binary, colour and soft masks)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dino_train.measure import jaccard as J
from dino_train.measure.attention import summarize
from dino_train.measure.masks import foreground, load_mask, object_ids, object_masks
from dino_train.models import build_backbone

REST = 0.30 / 14  # the mass each of the 14 other pixels holds in both hand-made heads


def _two_object_image() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x4 label map with object 1 at (0,0),(0,1) and object 2 at (3,2),(3,3), and two heads' CLS
    attention on it (patch 1): head 0 holds 0.35 + 0.35 on object 1; head 1 holds 0.5 on (3,2) and 0.2
    on (0,0). Their 60% masks: head 0 = object 1 exactly, head 1 = {(3,2), (0,0)}."""
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[0, 0] = labels[0, 1] = 1
    labels[3, 2] = labels[3, 3] = 2
    attn = torch.full((2, 4, 4), REST)
    attn[0, 0, 0] = attn[0, 0, 1] = 0.35
    attn[1, 3, 2], attn[1, 0, 0] = 0.5, 0.2
    return attn, labels


def test_the_papers_rule_by_hand_two_heads_two_objects():
    attn, labels = _two_object_image()
    s = J.score_attention(attn, labels, patch=1)
    assert s.object_ids == [1, 2]
    # Object 1: head 0's mask is the object (1); head 1's shares (0,0) of 3 pixels in the union (1/3).
    # Object 2: head 0 misses it (0); head 1 shares (3,2) of {(3,2), (3,3), (0,0)} (1/3).
    assert s.best.tolist() == pytest.approx([100.0, 100 / 3])
    assert s.best_head.tolist() == [0, 1]
    # Against the foreground (4 pixels), each head's 2-pixel mask holds 2 of them: 50 each.
    assert s.per_head.tolist() == pytest.approx([50.0, 50.0])
    # The head mean: 0.275 at (0,0), 0.2607 at (3,2), 0.1857 at (0,1) hold 72% -> 3 of the 4 pixels.
    assert s.head_mean == pytest.approx(75.0)


def test_the_papers_rule_and_the_head_mean_mask_differ_and_average_per_image(monkeypatch):
    """Two images through attention_jaccard: the two-object one above (paper's rule 66.7, head mean 75)
    and a one-object image whose heads both miss it (0 and 0). The paper's rule averages each image's
    mean over its objects (66.7 and 0 -> 33.3), not the three objects together (44.4)."""
    attn, labels = _two_object_image()
    miss = torch.full((2, 4, 4), 0.3 / 15)
    miss[:, 0, 0] = 0.7  # both heads on (0,0); the object sits at (2,2)
    alone = torch.zeros(4, 4, dtype=torch.long)
    alone[2, 2] = 7
    maps = iter([attn, miss])

    # The rule is under test, not a ViT: the maps come from the hand-made heads.
    monkeypatch.setattr(
        J, "cls_attention_maps", lambda model, images, block=-1: torch.stack([next(maps) for _ in images])
    )
    monkeypatch.setattr(J, "vit_patch_size", lambda model: 1)
    model = torch.nn.Linear(1, 1)  # only its parameters' device is read
    images = [torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)]
    res = J.attention_jaccard(model, images, [labels, alone])
    assert res.per_image_paper == pytest.approx([200 / 3, 0.0])
    assert res.best_head_per_object == pytest.approx(100 / 3)
    assert res.objects == 3 and [(o.image, o.object_id) for o in res.per_object] == [(0, 1), (0, 2), (1, 7)]
    assert res.per_image == pytest.approx([75.0, 0.0]) and res.head_mean_mask == pytest.approx(37.5)
    assert res.per_head == pytest.approx([25.0, 25.0]) and res.best_single_head == pytest.approx(25.0)
    assert res.as_dict()["best_head_per_object"] == res.best_head_per_object


def test_the_brightness_split_follows_the_papers_rule_per_object(monkeypatch):
    """Object 1 brighter than the rest of its image, object 2 darker: each group holds its object's
    best-head Jaccard (100 and 33.3), not the image's head-mean score."""
    attn, labels = _two_object_image()
    monkeypatch.setattr(J, "cls_attention_maps", lambda model, images, block=-1: attn[None])
    monkeypatch.setattr(J, "vit_patch_size", lambda model: 1)
    rgb = torch.full((3, 4, 4), 0.5)
    rgb[:, labels == 1] = 1.0
    rgb[:, labels == 2] = 0.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    image = ((rgb - mean[:, None, None]) / std[:, None, None])[None]
    res = J.attention_jaccard(torch.nn.Linear(1, 1), [image], [labels])
    assert res.by_brightness() == pytest.approx({J.BRIGHTER: 100.0, J.DARKER: 100 / 3})
    assert res.brightness_counts() == {J.BRIGHTER: 1, J.DARKER: 1}


def test_references_follow_the_papers_rule_per_object():
    """Attention even on each object, by the paper's rule: one object per reference map, so two small
    objects each score 100 (a head-mean map even on both would keep only one of them at 60%)."""
    _, labels = _two_object_image()
    refs = J.reference_jaccards([labels], patch=1)
    assert refs[J.EVEN] == pytest.approx(100.0)
    assert J.PRIOR not in refs  # needs two masks or more


def test_a_real_vit_scores_the_same_through_both_doors(tmp_path):
    """attention_jaccard on a real ViT equals score_attention on the maps summarize gives it."""
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=16, img_size=64).eval()
    image = torch.randn(1, 3, 64, 64)
    labels = torch.zeros(64, 64, dtype=torch.long)
    labels[8:40, 8:30], labels[40:60, 30:60] = 3, 5
    res = J.attention_jaccard(vit, [image], [labels])
    by_hand = J.score_attention(summarize(vit, image).heads[0], labels, 16)
    assert [o.jaccard for o in res.per_object] == pytest.approx(by_hand.best.tolist())
    assert res.best_head_per_object == pytest.approx(float(by_hand.best.mean()))


def _save(arr: np.ndarray, path, mode: str | None = None):
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode)
    img.save(path)
    return path


def test_mask_files_are_read_as_label_maps(tmp_path):
    voc = np.zeros((8, 8), np.uint8)
    voc[1:4, 1:4], voc[5:7, 5:7] = 1, 2
    voc[0, :] = 255  # VOC's void border: not an object where others are
    pal = Image.fromarray(voc, "P")
    pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "voc.png")
    labels = load_mask(tmp_path / "voc.png", (8, 8), 1)
    assert object_ids(labels) == [1, 2] and object_masks(labels).shape == (2, 8, 8)
    assert int(foreground(labels).sum()) == 9 + 4
    binary = _save(np.where(voc == 1, 255, 0).astype(np.uint8), tmp_path / "binary.png")
    assert object_ids(load_mask(binary, (8, 8), 1)) == [255]  # 255 alone: the one object
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[1:4, 1:4] = (200, 10, 10)
    rgb[5:7, 5:7] = (10, 200, 10)
    assert len(object_ids(load_mask(_save(rgb, tmp_path / "rgb.png"), (8, 8), 1))) == 2
    soft = np.clip(np.arange(64).reshape(8, 8) * 4, 0, 255).astype(np.uint8)  # 63 grey levels ramp
    soft_ids = object_ids(load_mask(_save(soft, tmp_path / "soft.png"), (8, 8), 1))
    assert len(soft_ids) == 63  # at most 64 levels: a label map
    ramp = np.tile(np.arange(256, dtype=np.uint8), (2, 1))  # 255 grey levels: a soft mask, halved
    soft_mask = load_mask(_save(ramp, tmp_path / "ramp.png"), (256, 2), 1)
    assert object_ids(soft_mask) == [255] and int(foreground(soft_mask).sum()) == 2 * 128


def test_resizing_a_mask_keeps_its_ids(tmp_path):
    voc = np.zeros((4, 4), np.uint8)
    voc[:2, :2], voc[2:, 2:] = 3, 9
    path = _save(voc, tmp_path / "m.png")
    big = load_mask(path, (16, 16), 8)  # nearest: no blended ids at the borders
    assert set(torch.unique(big).tolist()) == {0, 3, 9} and big.shape == (16, 16)
    assert object_ids(load_mask(path, (20, 18), 8)) == [3, 9]  # cropped to whole 8 px patches: 16 x 16
    with pytest.raises(ValueError, match="not a readable mask"):
        (tmp_path / "bad.png").write_text("not an image")
        load_mask(tmp_path / "bad.png", (4, 4), 1)
