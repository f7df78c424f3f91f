"""Bad images and paths: converted where that is right, skipped with a warning otherwise, never a crash."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from dino_train.config import load_config
from dino_train.data import DataError, ImageDataset, build_pretrain_loader
from dino_train.data.datasets import load_rgb, to_rgb
from dino_train.train import train
from tests.helpers import tiny_overrides


def write_good(folder, n, size=40):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"good{i:02d}.png"
        )


def write_bad(folder):
    """Every kind of broken file; returns the names that must be skipped."""
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    (folder / "garbage.jpg").write_bytes(
        np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8).tobytes()
    )
    return {"truncated.jpg", "zero.png", "text.png", "garbage.jpg"}


def write_odd_but_fine(folder):
    Image.new("L", (30, 30), 128).save(folder / "gray.png")
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(folder / "rgba.png")
    pal = Image.new("P", (30, 30), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(folder / "palette.png", transparency=0)
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16)).save(folder / "sixteen.png")
    Image.new("RGB", (3, 3), (5, 5, 5)).save(folder / "tiny.png")
    Image.new("RGB", (4000, 3000), (9, 9, 9)).save(folder / "huge.jpg")
    return 7


def test_every_mode_becomes_8bit_rgb(tmp_path):
    write_odd_but_fine(tmp_path)
    for path in sorted(tmp_path.iterdir()):
        img = load_rgb(path)
        assert img.mode == "RGB", path
    assert load_rgb(tmp_path / "sixteen.png").getpixel((0, 0)) == (255, 255, 255)  # not clipped to garbage
    assert load_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_rgb(tmp_path / "cmyk.jpg").getpixel((5, 5))[0] > 200  # cyan-free magenta+yellow = red
    f = Image.fromarray(np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10), "F")
    assert np.asarray(to_rgb(f))[..., 0].min() == 0 and np.asarray(to_rgb(f))[..., 0].max() == 255


@pytest.mark.slow
def test_bad_files_are_skipped_counted_and_named(tmp_path, one_thread):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_good(folder, 10)
    write_odd_but_fine(folder)
    bad = write_bad(folder)
    ds = ImageDataset(folder)
    assert len(ds) == 10 + 7 + len(bad)
    out = tmp_path / "run"
    overrides = tiny_overrides(folder.parent, out, "train.epochs=1", "optim.warmup_epochs=0")
    overrides = [o for o in overrides if not o.startswith("data.path=")] + [f"data.path={folder}"]
    with pytest.warns(UserWarning, match="skipping unreadable image") as record:
        result = train(load_config(None, overrides))
    assert result.step == 2  # 21 images / batch 8: a full epoch ran
    skips = [str(w.message) for w in record if "skipping unreadable image" in str(w.message)]
    named = {m.split("skipping unreadable image ")[1].split(":")[0].rsplit("/", 1)[1] for m in skips}
    assert named and named <= bad  # only the broken files, each named
    epochs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"kind": "epoch"' in x]
    assert epochs[0]["skipped_files"] == len(skips)  # every skip is counted in the epoch's log


def test_no_readable_image_is_an_error_before_training(tmp_path):
    folder = tmp_path / "allbad"
    folder.mkdir()
    write_bad(folder)
    with pytest.raises(DataError, match="could be read"):
        build_pretrain_loader(str(folder), lambda im: [im], 1, 0, 0, 0, 1, False)


def test_paths_that_are_not_data_sets(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_pretrain_loader(str(tmp_path / "nope"), lambda im: [im], 1, 0, 0, 0, 1, False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        ImageDataset(tmp_path / "file.txt")
    (tmp_path / "classes" / "empty_class").mkdir(parents=True)
    with pytest.warns(UserWarning, match="empty_class has no images"):
        with pytest.raises(DataError, match="no images found"):
            ImageDataset(tmp_path / "classes")
