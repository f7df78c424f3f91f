"""Benchmark of attention videos: frames per second of ViT-S/16 and ViT-S/8 (random weights) on generated
480x640 frames, batched against one frame at a time.

Two measures per model and batch size: ``attention`` (normalised frames -> coloured attention frames, the
model's share) and ``end to end`` (PIL frames -> resize/normalise -> attention -> H.264 mp4, the
``visualize_attention`` video path without decoding).

``python -m bench.attention_video --frames 16 --batch-sizes 8 1`` prints a table and writes
bench/results/attention_video.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.args import RESULTS, add_device, add_json, add_threads, pick_bench_device, write_result
from bench.memory import peak_mib, reset_peak
from dino_train.measure.attention import prepare_image
from dino_train.models import build_backbone
from eval.attention.video import attention_frames, write_attention_video


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["vit_small/16", "vit_small/8"], help="arch/patch")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--frames", type=int, default=16, help="frames timed per measure")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    add_device(p)
    add_threads(p)
    p.add_argument("--no-end-to-end", action="store_true", help="time the attention only")
    add_json(p, RESULTS / "attention_video.json")
    return p.parse_args(argv)


def make_frames(n: int, height: int, width: int) -> list[Image.Image]:
    """Moving gradients with a bright square: cheap to make, not trivial to encode."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(n):
        arr = np.stack([(xx + 8 * t) % 256, (yy + 4 * t) % 256, (xx + yy) // 4 % 256], -1).astype(np.uint8)
        y0, x0 = (20 + 7 * t) % (height - 64), (30 + 11 * t) % (width - 64)
        arr[y0 : y0 + 64, x0 : x0 + 64] = 255
        frames.append(Image.fromarray(arr))
    return frames


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_attention(model: torch.nn.Module, x: torch.Tensor, batch: int, device: torch.device) -> float:
    """Seconds for all frames of ``x`` (N, 3, H, W) in chunks of ``batch``, after one warm-up chunk."""
    # Warm-up: on a GPU with the timed batch size (kernel choice depends on the shape); on a CPU one frame.
    warm = x[:batch] if device.type == "cuda" else x[:1]
    attention_frames(model, warm.to(device), 0.6, -1, False, False)
    _sync(device)
    start = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        attention_frames(model, x[i : i + batch].to(device), 0.6, -1, False, False)
    _sync(device)
    return time.perf_counter() - start


def time_end_to_end(
    model: torch.nn.Module, frames: list[Image.Image], batch: int, device: torch.device
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.mp4"
        # The model is warm from time_attention; this warms the encoder and the resize path.
        write_attention_video(model, frames[:1], out, 25, None, batch_size=1, progress=False)
        _sync(device)
        start = time.perf_counter()
        write_attention_video(model, frames, out, 25, None, batch_size=batch, progress=False)
        _sync(device)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_bench_device(args)
    frames = make_frames(args.frames, args.height, args.width)
    rows = []
    print(f"attention video: {args.frames} frames of {args.height}x{args.width}, device {device.type}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'model':<13} {'tokens':>6} {'batch':>5} {'attention fps':>14} {'e2e fps':>12} {'peak MiB':>9}")
    for spec in args.archs:
        arch, patch = spec.split("/")
        model = build_backbone(arch, int(patch), 224).eval().to(device)
        x = torch.cat([prepare_image(f, None, int(patch)) for f in frames])
        tokens = (x.shape[-2] // int(patch)) * (x.shape[-1] // int(patch)) + 1
        for batch in args.batch_sizes:
            reset_peak(device)
            att_s = time_attention(model, x, batch, device)
            row = {"arch": spec, "tokens": tokens, "batch": batch, "attention_fps": args.frames / att_s}
            row["attention_peak_mib"] = peak_mib(device)
            if not args.no_end_to_end:
                row["end_to_end_fps"] = args.frames / time_end_to_end(model, frames, batch, device)
            rows.append(row)
            e2e = f"{row['end_to_end_fps']:>12.2f}" if "end_to_end_fps" in row else f"{'-':>12}"
            print(f"{spec:<13} {tokens:>6} {batch:>5} {row['attention_fps']:>14.2f} {e2e} "
                  f"{row['attention_peak_mib']:>9.0f}", flush=True)  # fmt: skip
    result = {
        "frame_size": [args.height, args.width],
        "frames": args.frames,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "peak_memory_kind": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "process RSS high-water",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "rows": rows,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
