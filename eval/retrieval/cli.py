"""``eval_retrieval``: image retrieval and copy detection with a frozen backbone, mAP as the release reports.

    eval_retrieval --checkpoint ckpt.pth --query queries/ --gallery gallery/ --output-dir runs/retrieval
    eval_retrieval --checkpoint ckpt.pth --gallery roxford5k/jpg --gnd roxford5k/gnd_roxford5k.pkl
    eval_retrieval --checkpoint ckpt.pth --protocol copydays --gallery copydays/original \\
        --query copydays --distractors yfcc_10k/ --whitening-data yfcc_20k/ --match-prefix 4

Every query ranks the gallery (plus --distractors) by the cosine similarity of L2-normalised
descriptors (exact faiss inner-product search). Ground truth comes from a gnd file (--gnd; the revisited
Oxford/Paris files give mAP under the easy, medium and hard protocols; the release reports medium and
hard) or from file names: a query's positives are the gallery images whose stem it starts with (stem, or
stem followed by _ - or .), or, with --match-prefix N, whose first N characters it shares.

plain (the release's eval_image_retrieval): CLS descriptor of each image shrunk to --imsize 224 on its
longer side, aspect kept, full ranking. copydays (the release's eval_copy_detection): CLS + GeM(p=4)
patch-token descriptor of images resized to --imsize 320 square, optional PCA whitening learned on
--whitening-data, AP over the top 20; queries in sub-folders of --query (strong/, jpegqual/30/, ...)
are also scored per folder. retrieval_results.json records every setting.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dino_train.measure.features import FeatureFn, extract_features
from dino_train.measure.knn import faiss_topk
from dino_train.models.backbone import NotAViTError
from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.files import check_writable_dir, write_json
from eval.common import (
    add_backbone_args,
    add_workers_arg,
    backbone_from_args,
    backbone_record,
    print_table,
    refuse_bands,
    run_tool,
    settings_record,
    setup_process,
)
from eval.flags import whole
from eval.retrieval import gnd as gt
from eval.retrieval.features import (
    DESCRIPTORS,
    MULTISCALE_SCALES,
    RESIZE_MODES,
    RetrievalImages,
    descriptor_fn,
)
from eval.retrieval.metrics import evaluate_revisited, mean_average_precision
from eval.retrieval.whitening import learn_whitening

RESULTS_FILE = "retrieval_results.json"
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "plain": {"imsize": 224, "resize_mode": "thumbnail", "descriptor": "cls", "topk": 0},
    "copydays": {"imsize": 320, "resize_mode": "square", "descriptor": "cls+gem", "topk": 20},
}


@dataclass
class Sets:
    """The image lists of one evaluation and the ground truth of its queries."""

    queries: list[Path]
    gallery: list[Path]  # ground-truth indices point into this list
    distractors: list[Path] = field(default_factory=list)  # appended to the gallery, never positives
    whitening: list[Path] = field(default_factory=list)
    gnd: list[dict[str, np.ndarray]] | None = None  # from --gnd; None: file-name truth
    query_root: Path | None = None  # blocks are the queries' folders relative to it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_retrieval", description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument(
        "--query", help="folder of query images (with --gnd: where its qimlist lies; default --gallery)"
    )
    p.add_argument("--gallery", help="folder of gallery (database) images; with --gnd, where its imlist lies")
    p.add_argument("--gnd", help="ground truth: revisitop gnd_*.pkl (read without running code) or its JSON")
    p.add_argument("--protocol", choices=list(PROTOCOL_DEFAULTS), default="plain", help="see above")
    p.add_argument("--distractors", help="folder of extra gallery images that match no query")
    p.add_argument(
        "--match-prefix", type=whole(1), help="file-name truth: match the first N characters of stems"
    )
    p.add_argument(
        "--multiscale", action="store_true", help="average descriptors at scales 1, 1/sqrt(2), 1/2"
    )
    p.add_argument("--whitening", action="store_true", help="PCA-whiten descriptors (needs --whitening-data)")
    p.add_argument(
        "--whitening-data", help="folder of images to learn the whitening on (implies --whitening)"
    )
    p.add_argument("--whitening-centred", action="store_true", help="whiten with the covariance, not X^T X/N")
    p.add_argument("--imsize", type=whole(1), help="image size in px (default: 224 plain, 320 copydays)")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, help="default: thumbnail plain, square copydays")
    p.add_argument("--descriptor", choices=DESCRIPTORS, help="default: cls plain, cls+gem copydays")
    p.add_argument("--topk", type=whole(0), help="ranking length for AP, 0 = whole gallery (default: 0 / 20)")
    p.add_argument(
        "--batch-size", type=whole(1), default=16, help="images per forward pass (1 for thumbnail)"
    )
    add_workers_arg(p)
    p.add_argument("--output-dir", help=f"write {RESULTS_FILE} here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the protocol's defaults and check the flags that go together."""
    for key, value in PROTOCOL_DEFAULTS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.whitening = bool(args.whitening or args.whitening_data)
    if args.whitening and not args.whitening_data:
        raise SystemExit("error: --whitening needs --whitening-data DIR (images to learn it on)")
    if not args.gallery:
        raise SystemExit("error: give --gallery DIR")
    if not args.query and not args.gnd:
        raise SystemExit("error: give --query DIR (or --gnd FILE, whose queries lie in --gallery)")
    if args.topk < 0 or args.imsize < 1 or args.batch_size < 1 or (args.match_prefix or 1) < 1:
        raise SystemExit("error: --topk must be >= 0; --imsize, --batch-size and --match-prefix >= 1")
    return args


def load_sets(args: argparse.Namespace) -> Sets:
    """The query, gallery, distractor and whitening images the flags name."""
    extra = gt.list_images(args.distractors, "--distractors") if args.distractors else []
    whiten = gt.list_images(args.whitening_data, "--whitening-data") if args.whitening_data else []
    if args.gnd:
        gnd = gt.read_gnd(args.gnd)
        gallery = gt.find_named(args.gallery, gnd["imlist"], "--gallery")
        queries = gt.find_named(args.query or args.gallery, gnd["qimlist"], "--query")
        return Sets(queries, gallery, extra, whiten, gnd["gnd"])
    queries = gt.list_images(args.query, "--query")
    return Sets(queries, gt.list_images(args.gallery, "--gallery"), extra, whiten, None, Path(args.query))


def embed(
    model: nn.Module, files: list[Path], fn: FeatureFn, args: argparse.Namespace, device: torch.device
) -> torch.Tensor:
    """(N, D) float32 descriptors of ``files``, shared between processes under torchrun."""
    if not files:
        return torch.zeros(0, 0)
    images = RetrievalImages(files, args.imsize, args.resize_mode)
    batch = 1 if args.resize_mode == "thumbnail" else args.batch_size  # thumbnails differ in size
    feats, _ = extract_features(model, images, batch, args.num_workers, device, not args.no_progress, fn)
    return feats


def describe(model: nn.Module, sets: Sets, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Query and gallery (+ distractor) descriptors, whitened when asked, L2-normalised."""
    fn = descriptor_fn(args.descriptor, MULTISCALE_SCALES if args.multiscale else None)
    model = model.to(device)
    queries = embed(model, sets.queries, fn, args, device)
    gallery = embed(model, sets.gallery + sets.distractors, fn, args, device)
    out: dict[str, Any] = {"whitening": None}
    if args.whitening:
        w = learn_whitening(embed(model, sets.whitening, fn, args, device), centred=args.whitening_centred)
        queries, gallery = w.apply(queries), w.apply(gallery)
        out["whitening"] = {"images": len(sets.whitening), "energy_kept": w.energy_kept}
    out["queries"], out["gallery"] = F.normalize(queries, dim=1), F.normalize(gallery, dim=1)
    return out


def rank(queries: torch.Tensor, gallery: torch.Tensor, topk: int) -> np.ndarray:
    """(Q, K) gallery indices by decreasing cosine similarity; K = topk, or the whole gallery for 0."""
    k = min(topk, gallery.shape[0]) if topk else gallery.shape[0]
    return faiss_topk(gallery, queries, k, use_gpu=False)[1].numpy()


def score(rankings: np.ndarray, sets: Sets, args: argparse.Namespace) -> dict[str, Any]:
    """The metrics: revisited easy/medium/hard for an easy/hard/junk gnd, else mAP (+ per-block mAP)."""
    if sets.gnd is not None and gt.is_revisited(sets.gnd):
        return {"revisited": evaluate_revisited(rankings, sets.gnd)}
    if sets.gnd is not None:
        truths = gt.plain_truths(sets.gnd)
    else:
        truths = gt.name_truths(sets.queries, sets.gallery, args.match_prefix)
    result = mean_average_precision(rankings, truths)
    if result["num_evaluated"] == 0:
        rule = f"first {args.match_prefix} characters" if args.match_prefix else "stem (then _ - or .)"
        where = args.gnd or f"file names: a query's {rule} naming a gallery image"
        raise gt.GroundTruthError(f"no query has a positive in the gallery by the ground truth ({where})")
    out: dict[str, Any] = {"overall": result}
    if sets.query_root is not None:
        blocks = gt.blocks_of(sets.queries, sets.query_root)
        if len(set(blocks)) > 1:
            out["blocks"] = _block_maps(blocks, result["aps"])
    return out


def _block_maps(blocks: list[str], aps: list[float | None]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(blocks)):
        scored = [a for b, a in zip(blocks, aps, strict=True) if b == name and a is not None]
        out[name] = {"map": float(np.mean(scored)) if scored else None, "num_evaluated": len(scored)}
    return out


def _pct(x: float | None) -> float | str:
    return "-" if x is None else 100 * x  # None: no query of that set had a positive


def _table(metrics: dict[str, Any]) -> None:
    if "revisited" in metrics:
        rows = [
            [p, _pct(r["map"]), *(_pct(v) for v in r["mp_at_k"].values())]
            for p, r in metrics["revisited"].items()
        ]
        print_table(["protocol", "mAP", "mP@1", "mP@5", "mP@10"], rows)
        return
    rows = [["all", _pct(metrics["overall"]["map"]), metrics["overall"]["num_evaluated"]]]
    rows += [[b, _pct(r["map"]), r["num_evaluated"]] for b, r in metrics.get("blocks", {}).items()]
    print_table(["queries", "mAP", "evaluated"], rows)


def _per_query(sets: Sets, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    names = [str(p) for p in sets.queries]
    if "revisited" in metrics:
        per = {p: r["aps"] for p, r in metrics["revisited"].items()}
        return [{"query": n, **{f"ap_{p}": per[p][i] for p in per}} for i, n in enumerate(names)]
    return [{"query": n, "ap": ap} for n, ap in zip(names, metrics["overall"]["aps"], strict=True)]


def report(args: argparse.Namespace, sets: Sets, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
    _table(metrics)
    if not args.output_dir:
        return
    per_query = _per_query(sets, metrics)
    for result in metrics.get("revisited", {}).values() or [metrics["overall"]]:
        result.pop("aps")  # listed per query below
    counts = {"num_queries": len(sets.queries), "num_gallery": len(sets.gallery)}
    counts |= {"num_distractors": len(sets.distractors), "num_whitening": len(sets.whitening)}
    write_json(
        Path(args.output_dir) / RESULTS_FILE,
        {"protocol": args.protocol, **metrics, **counts, **extra, "queries": per_query},
    )
    print(f"results in {Path(args.output_dir) / RESULTS_FILE}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args), (ValueError, NotAViTError))


def _run(args: argparse.Namespace) -> None:
    env, device = setup_process(args.device)
    resolve(args)
    if args.output_dir:
        check_writable_dir(args.output_dir, "--output-dir")
    sets = load_sets(args)
    model, info = backbone_from_args(args)
    refuse_bands(info, "eval_retrieval")
    if env.is_main:
        print(f"backbone: {info['arch']} from {info['path']} ({info['source']})", flush=True)
    start = time.perf_counter()
    feats = describe(model, sets, args, device)
    seconds = time.perf_counter() - start
    if env.is_main:
        metrics = score(rank(feats["queries"], feats["gallery"], args.topk), sets, args)
        extra = {
            "descriptor_dim": int(feats["queries"].shape[1]),
            "whitening": feats["whitening"],
            "features_seconds": seconds,
            "backbone": backbone_record(info),
            "settings": settings_record(args, device, env.world_size),
        }
        report(args, sets, metrics, extra)


if __name__ == "__main__":
    raise SystemExit(main())
