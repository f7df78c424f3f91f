"""visualize_attention end to end on tiny ViTs: image files and sizes, grids, videos (frame count, rate,
side by side), folders of frames, and one-line errors for bad inputs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from dino_train.models import build_backbone
from dino_train.models.loading import load_backbone
from eval.attention.figures import write_attention_grid
from eval.attention.visualize import main
from eval.common import EvalExit

pytestmark = pytest.mark.slow

HEADS = 3  # vit_tiny


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Backbone-only state dicts of random ViT-Tiny/8 and /16."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for patch in (8, 16):
        torch.manual_seed(patch)
        out[patch] = root / f"vit_tiny{patch}.pth"
        torch.save(build_backbone("vit_tiny", patch, 32).state_dict(), out[patch])
    return out


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _video(path: Path, n: int = 12, fps: int = 10, h: int = 48, w: int = 64) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            arr = np.full((h, w, 3), 20 * i % 256, dtype=np.uint8)
            arr[8:24, 4 * i : 4 * i + 16] = 255
            c.mux(s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        c.mux(s.encode())
    return path


def _decode(path: Path) -> tuple[int, Fraction, int, int]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return n, s.average_rate, s.width, s.height


@pytest.mark.parametrize(
    "patch,h,w,out_hw",
    [(8, 37, 53, (32, 48)), (16, 37, 53, (32, 48)), (8, 45, 61, (40, 56)), (16, 45, 61, (32, 48))],
)
def test_image_outputs_at_odd_sizes(checkpoints, tmp_path, patch, h, w, out_hw):
    img = _image(tmp_path / "in.png", h, w)
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoints[patch]), "--input", str(img), "--output", str(out)]
    assert main(args + ["--image-size", "0", "--side-by-side"]) == 0
    names = ["image", "attn-mean", "mask-mean", "overlay-attn-mean", "overlay-mask-mean"]
    for i in range(HEADS):
        names += [f"attn-head{i}", f"mask-head{i}", f"overlay-attn-head{i}", f"overlay-mask-head{i}"]
    for name in names:
        with Image.open(out / f"{name}.png") as im:
            assert im.size == (out_hw[1], out_hw[0]), name
    with Image.open(out / "mask-mean.png") as im:
        values = set(np.unique(np.asarray(im)).tolist())
    assert values <= {0, 255} and 255 in values
    with Image.open(out / "side-by-side.png") as im:
        assert im.size == (2 * out_hw[1], out_hw[0])
    with Image.open(out / "grid.png") as im:
        assert im.size[0] > 200 and im.size[1] > 100


def test_folder_of_images_and_resize(checkpoints, tmp_path):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    _image(src / "a.jpg", 40, 30, 1), _image(src / "sub" / "b.png", 50, 70, 2)
    out = tmp_path / "out"
    assert (
        main(
            ["--checkpoint", str(checkpoints[16]), "--input", str(src), "--output", str(out)]
            + ["--image-size", "48"]
        )
        == 0
    )
    with Image.open(out / "a" / "attn-mean.png") as a, Image.open(out / "sub" / "b" / "attn-head2.png") as b:
        assert a.size == (48, 64)  # 48x64 after the resize, both multiples of 16
        assert b.size == (64, 48)  # 48x67 -> 48x64


def test_write_attention_grid(checkpoints, tmp_path):
    model, _ = load_backbone(checkpoints[8])
    paths = [_image(tmp_path / "a.png", 37, 53, 1), _image(tmp_path / "b.png", 64, 40, 2)]
    grid = write_attention_grid(model, paths, tmp_path / "figs" / "grid.png", image_size=32)
    with Image.open(grid) as im:
        w, h = im.size
    assert grid.exists() and h > w / 3  # four rows of panels: two per image


def test_video_keeps_frames_and_rate(checkpoints, tmp_path):
    src = _video(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    base = [
        "--checkpoint",
        str(checkpoints[16]),
        "--input",
        str(src),
        "--output",
        str(out),
        "--image-size",
        "0",
    ]
    assert main(base + ["--batch-size", "5"]) == 0
    assert _decode(out / "clip-attention.mp4") == (12, Fraction(10), 64, 48)
    assert main(base + ["--side-by-side", "--apply-mask", "--batch-size", "4"]) == 0
    assert _decode(out / "clip-attention.mp4") == (12, Fraction(10), 128, 48)
    with av.open(str(out / "clip-attention.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.video[0].format.name == "yuv420p"


def test_folder_of_frames(checkpoints, tmp_path):
    src = tmp_path / "frames"
    src.mkdir()
    for i in range(5):
        _image(src / f"{i:03d}.png", 40, 56, i)
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoints[8]), "--input", str(src), "--output", str(out), "--video-frames"]
    assert main(args + ["--image-size", "0", "--fps", "5"]) == 0
    assert _decode(out / "frames-attention.mp4") == (5, Fraction(5), 56, 40)


def _error(capsys, args: list[str]) -> str:
    with pytest.raises(EvalExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1
    return err


def test_bad_inputs_are_one_line_errors(checkpoints, tmp_path, capsys):
    ckpt = ["--checkpoint", str(checkpoints[16]), "--output", str(tmp_path / "out")]
    missing = tmp_path / "nope.png"
    assert str(missing) in _error(capsys, ckpt + ["--input", str(missing)])
    text = tmp_path / "text.png"
    text.write_text("not an image\n")
    assert f"{text} is not a readable image" in _error(capsys, ckpt + ["--input", str(text)])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert f"{bad} cannot be decoded as a video" in _error(capsys, ckpt + ["--input", str(bad)])
    assert not (tmp_path / "out" / "bad-attention.mp4").exists()


def test_checkpoint_that_is_not_a_vit(tmp_path, capsys):
    linear = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(4, 2).state_dict(), linear)
    img = _image(tmp_path / "in.png", 32, 32)
    err = _error(capsys, ["--checkpoint", str(linear), "--input", str(img), "--output", str(tmp_path / "o")])
    assert str(linear) in err and "not a backbone" in err
