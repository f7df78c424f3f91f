"""Attention videos with PyAV, streaming: decode -> batch of frames -> attention -> encode, so memory does
not grow with the video's length. Output is H.264 in yuv420p with even sides, which every player takes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from dino_train.measure.attention import (
    apply_mask,
    colorize,
    denormalize,
    prepare_image,
    summarize,
    upsample,
    vit_patch_size,
)

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")


class VisualizeError(RuntimeError):
    """An input that cannot be visualised; the message names the path."""


def video_frames(path: Path) -> tuple[Iterator[Image.Image], Fraction | None, int | None]:
    """Decoded RGB frames of the first video stream (a lazy iterator), its frame rate and frame count
    (None when the container does not say)."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise VisualizeError(f"{path} cannot be decoded as a video ({err})") from err
    if not container.streams.video:
        container.close()
        raise VisualizeError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # decode with frame threads: decoding is a large share of the time on CPU
    rate = stream.average_rate or stream.guessed_rate

    def frames() -> Iterator[Image.Image]:
        count = 0
        try:
            for frame in container.decode(stream):
                count += 1
                yield frame.to_image()
        except av.FFmpegError as err:
            raise VisualizeError(f"{path} cannot be decoded as a video (frame {count}: {err})") from err
        finally:
            container.close()
        if count == 0:
            raise VisualizeError(f"{path} cannot be decoded as a video (no frame decoded)")

    return frames(), Fraction(rate) if rate else None, stream.frames or None


class H264Writer:
    """Appends (B, H, W, 3) uint8 frames to an mp4; opened on the first frames, which fix the size."""

    def __init__(self, path: Path, fps: float | Fraction):
        self.path, self.fps = path, Fraction(fps).limit_denominator(100_000)
        self.container: av.container.OutputContainer | None = None
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # yuv420p subsamples chroma 2x2
        if self.container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path), "w")
            stream = self.container.add_stream("libx264", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": "18"}
            self.stream = stream
        for arr in frames[:, :h, :w]:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            self.container.mux(self.stream.encode(frame))

    def close(self, flush: bool = True) -> None:
        container, self.container = self.container, None
        if container is None:
            return
        try:
            if flush:
                container.mux(self.stream.encode())  # the encoder's delayed frames
        finally:
            container.close()


def attention_frames(
    model: nn.Module, images: Tensor, threshold: float, block: int, side_by_side: bool, mask: bool
) -> np.ndarray:
    """Normalised (B, 3, H, W) frames -> (B, H, W or 2W, 3) uint8: the head-mean attention as an inferno
    heat map, or with ``mask`` the frame darkened outside the thresholded mean attention."""
    p = vit_patch_size(model)
    s = summarize(model, images, threshold, block)
    rgb = denormalize(images)
    if mask:
        panel = apply_mask(rgb, upsample(s.mean_mask, p)[:, 0])
    else:
        panel = colorize(upsample(s.mean, p)[:, 0])
    if side_by_side:
        panel = torch.cat([rgb, panel], dim=-1)
    return (panel * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def write_attention_video(
    model: nn.Module,
    frames: Iterable[Image.Image],
    out_path: Path,
    fps: float | Fraction,
    image_size: int | None,
    threshold: float = 0.6,
    block: int = -1,
    batch_size: int = 8,
    side_by_side: bool = False,
    apply_mask: bool = False,
    total: int | None = None,
    progress: bool = True,
) -> int:
    """Stream ``frames`` through the model ``batch_size`` at a time into an H.264 mp4 at ``fps``; returns
    the number of frames written. Frames are resized like the first one, so a folder of frames of mixed
    sizes still makes one video. A partial file is removed when an error stops the run."""
    p = vit_patch_size(model)
    device = next(model.parameters()).device
    writer = H264Writer(out_path, fps)
    first_size: tuple[int, int] | None = None
    batch: list[Tensor] = []

    def flush() -> None:
        x = torch.cat(batch).to(device, non_blocking=True)
        writer.write(attention_frames(model, x, threshold, block, side_by_side, apply_mask))
        batch.clear()

    try:
        for img in tqdm(
            frames, total=total, unit="frame", desc=out_path.name, disable=None if progress else True
        ):
            first_size = first_size or img.size
            if img.size != first_size:
                img = img.resize(first_size, Image.BICUBIC)
            batch.append(prepare_image(img, image_size, p))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        writer.close()
    except BaseException:
        writer.close(flush=False)
        out_path.unlink(missing_ok=True)
        raise
    if writer.frames == 0:
        raise VisualizeError(f"no frames to write to {out_path}")
    return writer.frames
