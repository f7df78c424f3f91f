"""Images that are not RGB (data.channels, data.band_stats): each file format read as bands and refused by
name when it does not fit, per-band statistics against numpy, the per-band augmentation's maths, an RGB
patch embedding adapted to N bands, and a multi-band run that trains, records its statistics, resumes bit
for bit, is refused on other statistics and is scored by eval_knn, eval_linear and dino.extract_features."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dino_train.config import ConfigError, load_config
from dino_train.data.band_augment import BandMultiCrop, band_eval_transform, jitter_bands, solarize_bands
from dino_train.data.band_stats_cli import main as stats_main
from dino_train.data.bands import (
    BandDataset,
    BandStats,
    compute_band_stats,
    load_band_stats,
    read_bands,
    save_band_stats,
)
from dino_train.data.datasets import DataError
from dino_train.data.embedded_bands import generate_band_dataset
from dino_train.data.sampler import seeded_call
from dino_train.models.architecture import infer_backbone
from dino_train.models.backbone import build_backbone
from dino_train.runtime import distributed as D
from dino_train.runtime.files import CheckpointError
from dino_train.train import train
from dino_train.train.init_weights import adapt_input_bands
from eval.knn.cli import main as knn_main
from eval.linear.cli import main as linear_main
from tests.helpers import fork_ranks, tiny_overrides

# ---------------------------------------------------------------- reading files


def test_every_format_is_read_as_its_bands(tmp_path):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 4000, size=(4, 6, 5)).astype(np.uint16)
    np.save(tmp_path / "chw.npy", chw)
    np.save(tmp_path / "hwc.npy", np.moveaxis(chw, 0, -1))
    np.savez(tmp_path / "named.npz", image=chw, other=np.zeros(3))
    np.savez(tmp_path / "single.npz", chw)
    for name in ("chw.npy", "hwc.npy", "named.npz", "single.npz"):
        got = read_bands(tmp_path / name, 4)
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(chw.astype(np.float32))), name
    # A multi-page TIFF: 16-bit greyscale pages, one band each, in page order.
    pages = [Image.fromarray(chw[b].astype(np.uint16)) for b in range(4)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert torch.equal(read_bands(tmp_path / "stack.tif", 4), torch.from_numpy(chw.astype(np.float32)))
    grey = rng.integers(0, 255, size=(6, 5)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert torch.equal(read_bands(tmp_path / "grey.png", 1)[0], torch.from_numpy(grey.astype(np.float32)))
    np.save(tmp_path / "plane.npy", grey)
    assert read_bands(tmp_path / "plane.npy", 1).shape == (1, 6, 5)


def test_files_that_do_not_fit_are_named(tmp_path):
    np.save(tmp_path / "three.npy", np.zeros((3, 4, 4)))
    with pytest.raises(
        DataError, match=r"three.npy: an array of shape \[3, 4, 4\] has no axis of data.channels=5"
    ):
        read_bands(tmp_path / "three.npy", 5)
    np.save(tmp_path / "nan.npy", np.full((2, 4, 4), np.nan))
    with pytest.raises(DataError, match="nan.npy: holds NaN"):
        read_bands(tmp_path / "nan.npy", 2)
    np.save(tmp_path / "code.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="code.npy: cannot be read"):  # never unpickled
        read_bands(tmp_path / "code.npy", 1)
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 4)), b=np.zeros((2, 4, 4)))
    with pytest.raises(
        DataError, match=r"two.npz: holds arrays \['a', 'b'\]; name the image's array 'image'"
    ):
        read_bands(tmp_path / "two.npz", 2)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: has 3 band"):
        read_bands(tmp_path / "rgb.png", 1)
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00")
    with pytest.raises(DataError, match="cut.npy: cannot be read"):
        read_bands(tmp_path / "cut.npy", 1)


# ---------------------------------------------------------------- statistics


def test_band_statistics_match_numpy_over_every_pixel(tmp_path):
    rng = np.random.default_rng(1)
    images = [
        rng.normal(1000 * (b + 1), 50, size=(3, h, w)) for b, (h, w) in enumerate([(5, 7), (9, 4), (6, 6)])
    ]
    images = [np.concatenate([x[:2], np.full((1, *x.shape[1:]), 7.0)]) for x in images]  # band 2 constant
    stats, n, constant = compute_band_stats(torch.from_numpy(x) for x in images)
    pixels = np.concatenate([x.reshape(3, -1) for x in images], axis=1)
    assert n == 3 and constant == [2]
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std[:2], pixels[:2].std(axis=1), rtol=1e-10)
    assert stats.std[2] == 1.0  # a constant band normalises to 0, not to a division by 0

    folder = tmp_path / "data"
    folder.mkdir()
    for i, x in enumerate(images):
        np.save(folder / f"{i}.npy", x.astype(np.float32))
    (folder / "broken.npy").write_bytes(b"not an array")
    assert (
        stats_main([str(folder), "--channels", "3", "--out", str(tmp_path / "s.json"), "--no-progress"]) == 0
    )
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["images"] == 3 and record["skipped"] == 1
    loaded = load_band_stats(tmp_path / "s.json", 3)
    np.testing.assert_allclose(loaded.mean, stats.mean, rtol=1e-6)
    with pytest.raises(DataError, match="s.json are for 3 bands, data.channels is 4"):
        load_band_stats(tmp_path / "s.json", 4)
    record["std"][1] = 0
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"bad.json: every std must be > 0"):
        load_band_stats(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"mean": [1]}')
    with pytest.raises(DataError, match="other.json: not a dino-band-stats file"):
        load_band_stats(tmp_path / "other.json")


# ---------------------------------------------------------------- augmentation


def test_the_per_band_ops_by_hand():
    x = torch.tensor([[[1.0, 3.0]], [[10.0, 30.0]]])  # 2 normalised bands of 1 x 2 pixels
    y = jitter_bands(x, torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5]))
    # band 0: brightness 2 about -2 -> [4, 8], contrast 1 keeps it; band 1: mean 20, contrast 0.5 -> [15, 25]
    torch.testing.assert_close(y, torch.tensor([[[4.0, 8.0]], [[15.0, 25.0]]]))
    torch.testing.assert_close(
        solarize_bands(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([-1.0, 0.0, -2.0])
    )
    stats = BandStats((10.0, 100.0), (2.0, 50.0))
    img = torch.stack([torch.full((8, 6), 12.0), torch.full((8, 6), 0.0)])
    out = band_eval_transform(stats, resize=4, crop=4)(img)
    assert out.shape == (2, 4, 4)
    torch.testing.assert_close(out, torch.stack([torch.ones(4, 4), torch.full((4, 4), -2.0)]))


def test_multi_crop_gives_every_crop_its_bands_and_repeats_with_its_seed():
    stats = BandStats((0.5,) * 5, (0.25,) * 5)
    augment = BandMultiCrop(stats, 16, (0.4, 1.0), 3, 8, (0.1, 0.4), (0.0, 1.0, 0.0))
    img = torch.rand(5, 30, 24)
    crops = seeded_call(augment, img, 7)
    assert [tuple(c.shape) for c in crops] == [(5, 16, 16)] * 2 + [(5, 8, 8)] * 3
    again = seeded_call(augment, img, 7)
    assert all(torch.equal(a, b) for a, b in zip(crops, again, strict=True))
    assert not torch.equal(seeded_call(augment, img, 8)[0], crops[0])
    assert (crops[1] <= 0).all()  # global crop 2 always solarised (p 1): nothing above a band's mean left


def test_a_crop_of_the_whole_image_leaves_the_image_as_it_was():
    """torchvision returns a whole-image crop at the image's own size as a view of it: normalising in
    place would normalise the sample itself, and every later crop of it twice."""
    stats = BandStats((0.5,) * 3, (0.25,) * 3)
    augment = BandMultiCrop(stats, 16, (1.0, 1.0), 2, 8, (0.1, 0.4), (0.0, 0.0, 0.0))
    img = torch.rand(3, 16, 16)
    before = img.clone()
    crops = seeded_call(augment, img, 3)
    assert torch.equal(img, before)
    assert crops[0].mean().abs() < 3  # normalised once: values of a few stds, not -mean/std everywhere


def test_an_rgb_patch_embedding_is_adapted_to_n_bands():
    rgb = build_backbone("vit_tiny", 8, 32, timm_kwargs={"depth": 1})
    six = build_backbone("vit_tiny", 8, 32, timm_kwargs={"depth": 1, "in_chans": 6})
    sd, adapted = adapt_input_bands(six, rgb.state_dict())
    assert adapted == ["patch_embed.proj.weight"]
    w = rgb.state_dict()["patch_embed.proj.weight"]
    torch.testing.assert_close(sd["patch_embed.proj.weight"], w.mean(1, keepdim=True).repeat(1, 6, 1, 1) / 2)
    six.load_state_dict(sd)
    # Equal bands of value g give what the RGB model gives a grey image of g.
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            six.patch_embed(grey.repeat(1, 6, 1, 1)), rgb.patch_embed(grey.repeat(1, 3, 1, 1))
        )


def test_a_cnn_stem_is_adapted_and_its_bands_are_read_from_its_weights():
    rgb = build_backbone("resnet18")
    five = build_backbone("resnet18", timm_kwargs={"in_chans": 5})
    sd, adapted = adapt_input_bands(five, rgb.state_dict())
    assert adapted == ["conv1.weight"]  # the stem only: no other weight takes 3 channels
    five.load_state_dict(sd)
    inferred = infer_backbone(five.state_dict(), "five.pth")
    assert inferred.arch == "resnet18" and inferred.spec.kwargs == {"in_chans": 5}
    vit = build_backbone("vit_tiny", 8, 32, timm_kwargs={"depth": 1, "in_chans": 4})
    assert infer_backbone(vit.state_dict(), "vit.pth").spec.kwargs["in_chans"] == 4


# ---------------------------------------------------------------- a multi-band run


@pytest.fixture(scope="module")
def band_data(tmp_path_factory):
    root = generate_band_dataset(tmp_path_factory.mktemp("bands") / "data", channels=5, informative=2,
                                 classes=3, train_per_class=8, val_per_class=4, size=32)  # fmt: skip
    stats, _, _ = compute_band_stats(BandDataset(root / "train", 5)[i][0] for i in range(24))
    save_band_stats(stats, root / "stats.json")
    return root


def band_overrides(root, out, *extra):
    return tiny_overrides(root, out, "data.channels=5", f"data.band_stats={root / 'stats.json'}", *extra)


def test_the_generated_set_is_deterministic_and_carries_the_class_in_its_first_bands(band_data, tmp_path):
    again = generate_band_dataset(tmp_path / "again", channels=5, informative=2, classes=3, train_per_class=8,
                                  val_per_class=4, size=32)  # fmt: skip
    for a in sorted((band_data / "train").rglob("*.npy")):
        b = again / a.relative_to(band_data)
        assert np.array_equal(np.load(a), np.load(b)), a
    x = np.load(next((band_data / "train").rglob("*.npy")))
    assert x.shape == (5, 32, 32) and x.dtype == np.uint16
    with pytest.raises(DataError, match="holds another data set"):
        generate_band_dataset(band_data, channels=4)


@pytest.mark.usefixtures("one_thread")
def test_a_multi_band_run_records_its_statistics_resumes_exactly_and_is_scored(band_data, tmp_path):
    full = train(load_config(None, band_overrides(band_data, tmp_path / "full")))
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    assert ckpt["backbone"]["kwargs"]["in_chans"] == 5
    stats = load_band_stats(band_data / "stats.json")
    assert ckpt["backbone"]["input_stats"] == stats.as_dict()
    assert load_band_stats(tmp_path / "full" / "band_stats.json") == stats  # stored with the run
    assert full.teacher.backbone.patch_embed.proj.weight.shape[1] == 5

    cut = tmp_path / "cut"
    train(load_config(None, band_overrides(band_data, cut, "train.max_steps=2")))
    resumed = train(load_config(None, band_overrides(band_data, cut)))
    assert resumed.step == full.step
    for a, b in ((full.teacher, resumed.teacher), (full.student, resumed.student)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), k

    # Other statistics would change what the inputs mean: refused, the checkpoint left as it was.
    other = BandStats(tuple(m + 1 for m in stats.mean), stats.std)
    save_band_stats(other, tmp_path / "other.json")
    before = (cut / "checkpoint.pth").read_bytes()
    changed = tiny_overrides(band_data, cut, "data.channels=5", f"data.band_stats={tmp_path / 'other.json'}",
                             "train.epochs=3")  # fmt: skip
    with pytest.raises(CheckpointError, match="was trained on inputs normalised by per-band mean"):
        train(load_config(None, changed))
    assert (cut / "checkpoint.pth").read_bytes() == before

    common = [
        "--data",
        str(band_data),
        "--resize",
        "32",
        "--crop",
        "32",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    for name in ("checkpoint.pth", "teacher_backbone.pth"):  # the record travels with both files
        assert knn_main(["--checkpoint", str(cut / name), "--ks", "1", "--output-dir", str(tmp_path / name),
                         *common]) == 0  # fmt: skip
        result = json.loads((tmp_path / name / "knn_results.json").read_text())
        assert 0 <= result["results"]["1"]["top1"] <= 100
    assert linear_main(["--checkpoint", str(cut / "checkpoint.pth"), "--cached-features", "--epochs", "2",
                        "--output-dir", str(tmp_path / "linear"), *common]) == 0  # fmt: skip

    import dino

    model = dino.load_backbone(str(cut / "teacher_backbone.pth"))
    feats = dino.extract_features(model, band_data / "val", image_size=32, resize=32, progress=False)
    assert feats.features.shape == (12, 192) and feats.classes == ["disc", "square", "triangle"]

    # Without its record (a backbone file from elsewhere), the statistics must be given.
    bare = tmp_path / "bare.pth"
    bare.write_bytes((cut / "teacher_backbone.pth").read_bytes())
    with pytest.raises(
        SystemExit, match="5-band backbone without recorded band statistics: give --band-stats"
    ):
        knn_main(["--checkpoint", str(bare), "--ks", "1", *common])
    assert knn_main(["--checkpoint", str(bare), "--band-stats", str(band_data / "stats.json"), "--ks", "1",
                     *common]) == 0  # fmt: skip
    # The tools that read RGB images say so instead of failing in the first forward.
    from eval.attention.cli import main as attention_main

    with pytest.raises(SystemExit, match="eval_attention reads RGB images; .* is a 5-band backbone"):
        attention_main(["--checkpoint", str(cut / "checkpoint.pth"), "--images", str(band_data / "val"),
                        "--masks", str(band_data / "val")])  # fmt: skip


def test_multi_band_settings_are_checked_by_key(band_data, tiny_run, tmp_path):
    def refused(match, *extra):
        with pytest.raises(ConfigError, match=match):
            cfg = load_config(None, tiny_overrides(band_data, tmp_path / "r", *extra))
            train(cfg)
        assert not (tmp_path / "r" / "checkpoint.pth").exists()

    refused(r"data.band_stats: data.channels=5 needs per-band statistics: dino-data-stats", "data.channels=5")
    refused(r"data.band_stats: .*stats.json are for 5 bands, data.channels is 4", "data.channels=4",
            f"data.band_stats={band_data / 'stats.json'}")  # fmt: skip
    refused("data.format: multi-band images are read from folders", "data.channels=5", "data.format=shards",
            f"data.band_stats={band_data / 'stats.json'}")  # fmt: skip
    rgb_teacher = tiny_run[0] / "checkpoint.pth"  # a teacher must see the student's bands
    refused("distill.teacher: .* takes 3-band images; data.channels is 5", "data.channels=5",
            f"data.band_stats={band_data / 'stats.json'}", f"distill.teacher={rgb_teacher}")  # fmt: skip
    refused("model.timm_kwargs: in_chans comes from data.channels", "data.channels=5",
            f"data.band_stats={band_data / 'stats.json'}", "model.timm_kwargs={in_chans: 5}")  # fmt: skip


def _rank(rank: int, port: int, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_PORT=str(port),
                      MASTER_ADDR="127.0.0.1")  # fmt: skip
    assert train(load_config(None, overrides)).step == 2  # 24 images, 2 x 8 a step: one step an epoch


def test_two_gloo_ranks_train_on_bands(band_data, tmp_path):
    """Each rank reads its share of the N-band files; the checkpoint records the bands and statistics."""
    out = tmp_path / "run"
    fork_ranks(_rank, D.free_port(), band_overrides(band_data, out, "train.num_threads=1"))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["backbone"]["kwargs"]["in_chans"] == 5
    assert ckpt["backbone"]["input_stats"] == load_band_stats(band_data / "stats.json").as_dict()
