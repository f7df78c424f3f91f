"""Video object segmentation: the DAVIS J and F maths on hand-made masks, label propagation (a perfect
case reaching J = 1), the generated videos, and eval_video_segmentation end to end."""

import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from dino_train.data.embedded_video import davis_palette, generate_embedded_videos
from eval.video_seg import cli as video_seg_eval
from eval.video_seg.metrics import boundary_f, boundary_map, region_similarity, score_video, summarize
from eval.video_seg.propagation import (
    LabelPropagator,
    PropagationSettings,
    neighbourhood,
    one_hot,
    propagate,
    to_label_map,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _box(h, w, rows, cols):
    m = np.zeros((h, w), dtype=bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


# --------------------------------------------------------------------------------------- J and F


def test_region_similarity_by_hand():
    truth, pred = _box(10, 10, (2, 6), (2, 6)), _box(10, 10, (2, 6), (4, 8))
    assert region_similarity(truth, pred) == pytest.approx(8 / 24)  # 4x2 shared, 16 + 16 - 8 in all
    void = _box(10, 10, (0, 10), (6, 8))  # the prediction's right half is void: 8 / (16 + 8 - 8)
    assert region_similarity(truth, pred, void) == pytest.approx(0.5)
    empty = np.zeros((10, 10), dtype=bool)
    assert region_similarity(empty, empty) == 1.0 and region_similarity(truth, empty) == 0.0


def test_boundary_map_of_a_square_by_hand():
    b = boundary_map(_box(6, 6, (1, 4), (1, 4)))
    # Inside: the bottom row and right column of the square; outside: the pixels just above and left of
    # it, whose lower, right or lower-right neighbour is inside (the map is offset towards the origin).
    inside = {(3, 1), (3, 2), (3, 3), (1, 3), (2, 3)}
    outside = {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0)}
    assert set(zip(*np.nonzero(b), strict=True)) == inside | outside


def test_boundary_f_tolerance_and_spurious_regions_by_hand():
    truth, pred = _box(10, 20, (0, 10), (0, 10)), _box(10, 20, (0, 10), (0, 13))
    # Each boundary is one column (9 and 12): 3 px apart.
    assert boundary_f(truth, pred, tolerance=2) == 0.0
    assert boundary_f(truth, pred, tolerance=3) == 1.0
    # The default tolerance: ceil(0.008 * diagonal 22.4 px) = 1 px.
    assert boundary_f(truth, _box(10, 20, (0, 10), (0, 11))) == 1.0
    assert boundary_f(truth, _box(10, 20, (0, 10), (0, 12))) == 0.0
    # A spurious one-pixel blob adds 4 boundary pixels: precision 10/14, recall 1 -> F = 5/6.
    blob = truth.copy()
    blob[2, 18] = True
    assert boundary_f(truth, blob) == pytest.approx(5 / 6)
    empty = np.zeros_like(truth)
    assert boundary_f(empty, empty) == 1.0 and boundary_f(truth, empty) == 0.0


def test_score_video_skips_first_and_last_frames_and_summarises():
    truth = [np.zeros((8, 8), np.uint8) for _ in range(4)]
    for t in truth:
        t[2:6, 2:6] = 1
    pred = [t.copy() for t in truth]
    pred[0][:] = 0  # the first and last frames are not scored
    pred[3][:] = 0
    pred[2][2:6, 2:4] = 0  # half the object in frame 2: J 0.5
    s = score_video(truth, pred, [1])[1]
    assert s["frames"] == 2 and s["J"] == pytest.approx(0.75) and s["J_recall"] == 0.5
    total = summarize([s, {"J": 1.0, "F": 1.0}])
    assert total["J"] == pytest.approx(0.875) and total["J&F"] == pytest.approx((total["J"] + total["F"]) / 2)


# ---------------------------------------------------------------------------------- propagation


def test_neighbourhood_and_propagate_by_hand():
    allowed = neighbourhood(2, 3, 1)
    assert allowed.shape == (6, 6) and allowed[0, 4] and not allowed[0, 2]  # (0,0)-(1,1) yes, (0,2) no
    target = torch.tensor([[1.0, 0.0]])
    sources = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])  # cosines 1, 0.6, 0 with the target
    labels = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])  # (C=1, K=2, N=3)
    s = PropagationSettings(topk=2, temperature=1.0)
    out = propagate(target, sources, labels, s, None)
    w = torch.softmax(torch.tensor([1.0, 0.6]), 0)  # the top two, weighted exp(cos / T)
    torch.testing.assert_close(out[:, 0], w)
    # Only source 2 allowed: its label, whatever its similarity.
    only = torch.tensor([[False, False, True]])
    torch.testing.assert_close(propagate(target, sources, labels, s, only)[:, 0], torch.tensor([0.0, 1.0]))


def test_perfect_features_propagate_the_mask_exactly():
    """Features that are the true label of each patch: every frame's mask comes out exact (J = F = 1)
    after the release's bilinear upsampling, min-max scaling and argmax. The objects are full-height
    stripes on the patch grid: bilinear upsampling rounds off any corner inside the frame."""
    p, size = 8, (32, 64)
    truth = []
    for t in range(5):  # two stripes moving one patch per frame
        lab = np.zeros(size, np.uint8)
        lab[:, 8 * t : 8 * t + 8] = 1
        lab[:, 8 * t + 16 : 8 * t + 32] = 2
        truth.append(lab)

    def feats(lab):
        return one_hot(lab[::p, ::p], 3).permute(1, 2, 0) + 0.01  # (h, w, 3), not exactly one-hot

    prop = LabelPropagator(feats(truth[0]), one_hot(truth[0][::p, ::p], 3), PropagationSettings(radius=2))
    assert prop.grid == (4, 8)
    pred = [truth[0]] + [to_label_map(prop.step(feats(lab)), p, size) for lab in truth[1:]]
    scores = score_video(truth, pred, [1, 2])
    assert all(s["J"] == 1.0 and s["F"] == 1.0 for s in scores.values()), scores
    assert all(np.array_equal(a, b) for a, b in zip(truth, pred, strict=True))


# ----------------------------------------------------------------------------------- generator


def test_generated_videos_are_deterministic_davis_layout(tmp_path):
    a = generate_embedded_videos(tmp_path / "a", num_videos=1, num_frames=3, height=32, width=48)
    b = generate_embedded_videos(tmp_path / "b", num_videos=1, num_frames=3, height=32, width=48)
    frames = sorted((a / "JPEGImages" / "480p" / "shapes00").iterdir())
    masks = sorted((a / "Annotations" / "480p" / "shapes00").iterdir())
    assert (
        len(frames) == len(masks) == 3 and (a / "ImageSets" / "2017" / "val.txt").read_text() == "shapes00\n"
    )
    for m in masks:
        assert m.read_bytes() == (b / m.relative_to(a)).read_bytes()
    first = Image.open(masks[0])
    assert first.mode == "P" and first.getpalette()[:9] == davis_palette()[:9] == [
        0,
        0,
        0,
        128,
        0,
        0,
        0,
        128,
        0,
    ]
    assert set(np.unique(np.asarray(first))) == {0, 1, 2}  # both objects visible in the first frame
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="was not made by"):
        generate_embedded_videos(tmp_path / "mine")


# ----------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return generate_embedded_videos(tmp_path_factory.mktemp("v") / "videos", 1, 5, 32, 48)


def _run(ckpt, videos, out, *extra):
    args = ["--checkpoint", str(ckpt), "--videos", str(videos), "--output-dir", str(out)]
    video_seg_eval.main(
        [*args, "--short-side", "32", "--size-multiple", "16", "--fps", "5", "--no-progress", *extra]
    )
    return json.loads((out / "video_seg_results.json").read_text())


@pytest.mark.slow
def test_eval_video_segmentation_end_to_end(videos, backbone_file, tmp_path, capsys):
    res = _run(backbone_file, videos, tmp_path / "out")
    v = res["videos"]["shapes00"]
    assert v["frames"] == 5 and set(v["objects"]) == {"1", "2"} and v["input_size"] == [32, 48]
    assert 0.2 < res["summary"]["J&F"] <= 1.0 and res["summary"]["objects"] == 2, res["summary"]
    s = res["settings"]
    assert (s["n_last_frames"], s["topk"], s["size_mask_neighborhood"], s["temperature"]) == (7, 5, 12, 0.1)
    pngs = sorted((tmp_path / "out" / "shapes00").iterdir())
    assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(5)]
    assert all(Image.open(p).mode == "P" and Image.open(p).size == (48, 32) for p in pngs)
    with av.open(str(tmp_path / "out" / "shapes00.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    assert "J&F" in capsys.readouterr().out


@pytest.mark.slow
def test_a_release_checkpoint_of_the_same_weights_gives_the_same_scores(videos, backbone_file, tmp_path):
    import argparse

    from dino_train.runtime.files import with_prefix

    sd = torch.load(backbone_file, weights_only=True)
    release = {"teacher": with_prefix(sd, "backbone."), "student": with_prefix(sd, "module.backbone."),
               "epoch": 10, "args": argparse.Namespace(arch="vit_tiny", patch_size=8)}  # fmt: skip
    torch.save(release, tmp_path / "checkpoint.pth")
    ours = _run(backbone_file, videos, tmp_path / "ours", "--no-video")
    theirs = _run(tmp_path / "checkpoint.pth", videos, tmp_path / "release", "--no-video")
    assert theirs["backbone"]["source"] == "release-checkpoint" and theirs["summary"] == ours["summary"]
    assert not (tmp_path / "release" / "shapes00.mp4").exists()


def test_missing_first_mask_is_a_clean_error(videos, backbone_file, tmp_path, capsys):
    broken = tmp_path / "videos"
    shutil.copytree(videos, broken)
    (broken / "Annotations" / "480p" / "shapes00" / "00000.png").unlink()
    with pytest.raises(SystemExit) as exc:
        _run(backbone_file, broken, tmp_path / "out")
    assert exc.value.code == 2
    assert "error: video shapes00: the first frame's mask" in capsys.readouterr().err


def test_a_first_mask_of_another_size_or_without_objects(backbone_file, tmp_path, capsys):
    two = generate_embedded_videos(tmp_path / "two", 2, 3, 32, 48)
    first = two / "Annotations" / "480p" / "shapes01" / "00000.png"
    palette = Image.open(first).getpalette()
    empty = Image.fromarray(np.zeros((32, 48), np.uint8), mode="P")
    empty.putpalette(palette)
    empty.save(first)  # shapes01 now starts with no object: left out, named, the other video scored
    res = _run(backbone_file, two, tmp_path / "out", "--no-video")
    assert list(res["videos"]) == ["shapes00"] and res["skipped_without_objects"] == ["shapes01"]
    assert f"video shapes01 skipped: its first mask {first} holds no object" in capsys.readouterr().out
    wrong = Image.fromarray(np.ones((40, 40), np.uint8), mode="P")
    wrong.putpalette(palette)
    wrong.save(first)  # an object, at another size than its frame: an error naming both
    with pytest.raises(SystemExit) as exc:
        _run(backbone_file, two, tmp_path / "out2", "--no-video")
    assert exc.value.code == 2
    assert f"the first mask {first} is 40x40, its frame" in capsys.readouterr().err
