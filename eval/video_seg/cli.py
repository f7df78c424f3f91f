"""``eval_video_segmentation``: video object segmentation by label propagation (DAVIS 2017, semi-supervised).

    eval_video_segmentation --checkpoint ckpt.pth --videos /data/DAVIS --output-dir runs/davis
    python -m dino_train.data.embedded_video --out data/videos    # generated videos with true masks
    eval_video_segmentation --checkpoint ckpt.pth --videos data/videos --short-side 64 --size-multiple 16 ...

The first frame's mask is propagated through each video by the affinity of the backbone's patch features
to the first frame and the 7 previous ones (top 5 patches within 12 patches of each patch, weights
exp(cosine / 0.1)), as the release's eval_video_segmentation. Frames are resized to --short-side 480 px,
the long side floored to a multiple of --size-multiple 64 (the release's rule). Writes one palette PNG
per frame (<output-dir>/<video>/<frame>.png, the layout DAVIS evaluation reads), an overlay video
<video>.mp4, and, for videos annotated in every frame, the DAVIS J (region IoU), F (boundary F-measure)
and J&F per object and overall, into video_seg_results.json with every setting.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dino_train.data import DataError
from dino_train.data.embedded_video import write_mask
from dino_train.models.backbone import NotAViTError, patch_size_of
from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.device import pick_device
from dino_train.runtime.files import check_writable_dir, write_json
from eval.attention.video import H264Writer
from eval.common import (
    add_backbone_args,
    backbone_from_args,
    backbone_record,
    print_table,
    refuse_bands,
    run_tool,
    settings_record,
)
from eval.flags import POSITIVE, whole
from eval.video_seg import data as vd
from eval.video_seg.metrics import VOID_LABEL, score_video, summarize
from eval.video_seg.propagation import (
    LabelPropagator,
    PropagationSettings,
    one_hot,
    patch_features,
    to_label_map,
)

RESULTS_FILE = "video_seg_results.json"


def build_parser() -> argparse.ArgumentParser:
    d = PropagationSettings()
    p = argparse.ArgumentParser(
        prog="eval_video_segmentation", description=__doc__, formatter_class=HelpFormatter
    )
    add_backbone_args(p)
    p.add_argument("--videos", help="DAVIS-layout folder (JPEGImages/480p/<video>, Annotations/480p/<video>)")
    p.add_argument("--output-dir", help=f"where masks, overlay videos and {RESULTS_FILE} go")
    p.add_argument("--resolution", default="480p", help="the DAVIS resolution folder, when there is one")
    p.add_argument(
        "--split", help="file listing the videos, relative to --videos (default ImageSets/2017/val.txt)"
    )
    p.add_argument("--video-names", nargs="+", help="evaluate only these videos")
    p.add_argument(
        "--n-last-frames", type=whole(0), default=d.n_last_frames, help="previous frames in the context"
    )
    p.add_argument(
        "--topk", type=whole(1), default=d.topk, help="source patches each patch takes labels from"
    )
    p.add_argument(
        "--size-mask-neighborhood", type=whole(0), default=d.radius, help="window radius in patches"
    )
    p.add_argument("--temperature", type=POSITIVE, default=d.temperature, help="weights exp(cosine / T)")
    p.add_argument(
        "--chunk", type=whole(1), default=d.chunk, help="target patches per affinity block (memory)"
    )
    p.add_argument("--short-side", type=whole(1), default=vd.SHORT_SIDE, help="frame short side in px")
    p.add_argument(
        "--size-multiple", type=whole(1), default=vd.SIZE_MULTIPLE, help="long side floored to this"
    )
    p.add_argument(
        "--fps", type=POSITIVE, default=24.0, help="overlay video frame rate (DAVIS is filmed at 24)"
    )
    p.add_argument("--no-video", action="store_true", help="write the mask PNGs only, no overlay video")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--no-progress", action="store_true", help="no per-frame progress bar")
    return p


def _settings(args: argparse.Namespace) -> PropagationSettings:
    if args.topk < 1 or args.n_last_frames < 0 or args.temperature <= 0 or args.chunk < 1:
        raise SystemExit("error: need --topk >= 1, --n-last-frames >= 0, --temperature > 0, --chunk >= 1")
    return PropagationSettings(
        args.n_last_frames, args.topk, args.size_mask_neighborhood, args.temperature, args.chunk
    )


@torch.no_grad()
def segment_video(
    model: nn.Module,
    video: vd.Video,
    settings: PropagationSettings,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Propagate the first mask through ``video``; write its PNGs (and overlay). Returns the predicted
    (H, W) label maps, the object ids, the palette and the sizes."""
    first, palette = vd.read_labels(video.masks[0])
    p = patch_size_of(model)
    size = vd.target_size(*first.shape, args.short_side, args.size_multiple, p)
    grid = (size[0] // p, size[1] // p)
    objects = vd.object_ids(first)
    seed = vd.labels_on_grid(first, grid)
    frame, rgb = vd.read_frame(video.frames[0], size)
    if rgb.shape[:2] != first.shape:
        raise DataError(
            f"video {video.name}: the first mask {video.masks[0]} is {first.shape[1]}x{first.shape[0]}, "
            f"its frame {video.frames[0]} {rgb.shape[1]}x{rgb.shape[0]}: a mask must have its frame's size"
        )
    propagator = LabelPropagator(
        patch_features(model, frame.to(device)), one_hot(seed, max(objects, default=0) + 1), settings
    )
    out = Path(args.output_dir) / video.name
    out.mkdir(parents=True, exist_ok=True)
    writer = None if args.no_video else H264Writer(Path(args.output_dir) / f"{video.name}.mp4", args.fps)
    preds = [np.where(first == VOID_LABEL, 0, first).astype(np.uint8)]
    try:
        bar = tqdm(video.frames, desc=video.name, unit="frame", disable=args.no_progress, dynamic_ncols=True)
        for t, path in enumerate(bar):
            if t > 0:
                frame, rgb = vd.read_frame(path, size)
                soft = propagator.step(patch_features(model, frame.to(device)))
                preds.append(to_label_map(soft, p, rgb.shape[:2]))
            write_mask(out / f"{path.stem}.png", preds[-1], palette)
            if writer is not None:
                writer.write(vd.overlay(rgb, preds[-1], palette)[None])
    finally:
        if writer is not None:
            writer.close()
    return {"preds": preds, "objects": objects, "size": list(first.shape), "input_size": list(size)}


def score(video: vd.Video, result: dict[str, Any]) -> dict[str, Any]:
    """Per-object J and F of a fully annotated video (frames without a mask: not scored)."""
    if not video.fully_annotated:
        return {}
    truth = [vd.read_labels(m)[0] for m in video.masks if m is not None]
    for t, (gt, pred) in enumerate(zip(truth, result["preds"], strict=True)):
        if gt.shape != pred.shape:
            raise DataError(
                f"video {video.name}: mask {video.masks[t]} is {gt.shape}, its frame {pred.shape}"
            )
    return {str(k): v for k, v in score_video(truth, result["preds"], result["objects"]).items()}


def _row(name: str, s: dict[str, Any]) -> list[Any]:
    """A table row in percent; "-" where nothing was scored (a video without masks beyond the first)."""
    return [name, s["objects"], *("-" if s[k] is None else 100 * s[k] for k in ("J", "F", "J&F"))]


def _report(args: argparse.Namespace, per_video: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    rows = [_row(name, summarize(list(v["objects"].values()))) for name, v in per_video.items()]
    overall = summarize([o for v in per_video.values() for o in v["objects"].values()])
    print_table(["video", "objects", "J", "F", "J&F"], [*rows, _row("all", overall)])
    results = {"summary": overall, "videos": per_video, **extra}
    write_json(Path(args.output_dir) / RESULTS_FILE, results)
    print(f"masks and {RESULTS_FILE} in {args.output_dir}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args), (ValueError, NotAViTError))


def _run(args: argparse.Namespace) -> None:
    if not args.videos or not args.output_dir:
        raise SystemExit("error: give --videos DIR and --output-dir DIR")
    settings = _settings(args)
    check_writable_dir(args.output_dir, "--output-dir")
    videos = vd.find_videos(args.videos, args.resolution, args.video_names, args.split)
    model, info = backbone_from_args(args)
    refuse_bands(info, "eval_video_segmentation")
    device = pick_device(args.device, 0)
    model = model.to(device)
    print(
        f"backbone: {info['arch']} from {info['path']} ({info['source']}); {len(videos)} videos",
        flush=True,
    )
    start, per_video = time.perf_counter(), {}
    empty = []
    for i, video in enumerate(videos):
        print(f"[{i + 1}/{len(videos)}] {video.name}: {len(video.frames)} frames", flush=True)
        if not vd.object_ids(vd.read_labels(video.masks[0])[0]):
            # Nothing to propagate: the video is left out of the scores (it would count as 0 objects).
            print(f"warning: video {video.name} skipped: its first mask {video.masks[0]} holds no object")
            empty.append(video.name)
            continue
        result = segment_video(model, video, settings, args, device)
        per_video[video.name] = {"frames": len(video.frames), "objects": score(video, result),
                                 "size": result["size"], "input_size": result["input_size"]}  # fmt: skip
    if not per_video:
        raise DataError(f"no video of {args.videos} has an object in its first mask")
    extra = {"seconds": time.perf_counter() - start, "skipped_without_objects": empty,
             "backbone": backbone_record(info),
             "settings": settings_record(args, device, 1)}  # fmt: skip
    _report(args, per_video, extra)


if __name__ == "__main__":
    raise SystemExit(main())
