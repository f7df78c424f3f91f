"""``eval_knn``: weighted k-NN accuracy of a frozen backbone on a train/val class-folder data set.

    eval_knn --checkpoint runs/dino/checkpoint.pth --data /data/imagenet --output-dir runs/knn
    torchrun --nproc_per_node=2 -m eval.knn --checkpoint dino_deitsmall16_pretrain.pth --data ...

Features are the final-norm CLS token after a bicubic resize of the short side and a centre crop: by
default CenterCrop(224) after Resize(256), the release's rule, which for another --crop C resizes to
C * 256 / 224 (the rule of every door: eval_linear, dino.extract_features, training's k-NN monitor).
Extraction is shared between processes under torchrun; the (cheap, faiss) classification runs on rank 0.
knn_results.json records every setting that produced it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dino_train.data.band_augment import eval_preprocess
from dino_train.data.labelled import class_folders
from dino_train.measure.knn import KNN_KS, KNN_TEMPERATURE
from dino_train.measure.knn_bank import classify_bank, extract_bank
from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.files import atomic_save, check_writable_dir, write_json
from eval.common import (
    add_backbone_args,
    add_size_args,
    add_workers_arg,
    backbone_from_args,
    backbone_record,
    band_inputs,
    eval_sizes,
    print_table,
    run_tool,
    settings_record,
    setup_process,
    split_roots,
    write_scalars,
)
from eval.flags import POSITIVE, whole

FEATURES_FILE = "knn_features.pth"
PATCH_DIR = "patch_tokens"  # under --dump-features DIR: one feature store per split
RESULTS_FILE = "knn_results.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_knn", description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument("--data", help="folder with train/ and val/ class folders")
    p.add_argument("--ks", type=whole(1), nargs="+", default=list(KNN_KS), help="numbers of neighbours")
    p.add_argument(
        "--temperature", type=POSITIVE, default=KNN_TEMPERATURE, help="votes weigh exp(cosine / T)"
    )
    p.add_argument("--batch-size", type=whole(1), default=64, help="images per forward pass, per process")
    add_workers_arg(p)
    add_size_args(p)
    p.add_argument("--dump-features", metavar="DIR", help=f"save the features to DIR/{FEATURES_FILE}")
    p.add_argument(
        "--patch-tokens",
        action="store_true",
        help=f"with --dump-features: also each image's patch tokens (h*w, D) in float16, streamed to the "
        f"feature stores DIR/{PATCH_DIR}/train and /val (read them with "
        "dino_train.measure.feature_store.open_store)",
    )
    p.add_argument("--load-features", metavar="DIR", help="reuse features saved by --dump-features")
    p.add_argument("--output-dir", help=f"write {RESULTS_FILE} and TensorBoard scalars here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if seen")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    env, device = setup_process(args.device)
    for flag, folder in (("--output-dir", args.output_dir), ("--dump-features", args.dump_features)):
        if folder:  # before any work: an unusable folder fails now, not after the extraction
            check_writable_dir(folder, flag)
    start = time.perf_counter()
    if args.load_features:
        bank = _load_bank(Path(args.load_features) / FEATURES_FILE)
    else:
        if not args.data:
            raise SystemExit("error: give --data (or --load-features DIR)")
        if args.patch_tokens and not args.dump_features:
            raise SystemExit("error: --patch-tokens writes into the --dump-features DIR: give one")
        backbone, info = backbone_from_args(args)
        if args.patch_tokens and not hasattr(backbone, "num_prefix_tokens"):
            raise SystemExit(f"error: --patch-tokens needs a ViT; {info['arch']} has no patch tokens")
        if env.is_main:
            print(f"backbone: {info['arch']} from {info['path']} ({info['source']})", flush=True)
        resize, crop = eval_sizes(args)
        stats, channels = band_inputs(info, args)
        tf = eval_preprocess(stats, resize, crop)
        data = class_folders(*split_roots(args.data), tf, tf, channels)
        patches = Path(args.dump_features) / PATCH_DIR if args.patch_tokens else None
        bank = extract_bank(
            backbone, data, args.batch_size, args.num_workers, device, not args.no_progress, patches
        )
        bank["backbone"] = backbone_record(info)
        bank["extraction"] = settings_record(args, device, env.world_size)
    seconds = time.perf_counter() - start
    if args.dump_features and env.is_main:
        Path(args.dump_features).mkdir(parents=True, exist_ok=True)
        atomic_save(bank, Path(args.dump_features) / FEATURES_FILE)
    if env.is_main:
        results = classify_bank(bank, args.ks, args.temperature)
        _report(args, bank, results, seconds, settings_record(args, device, env.world_size))


def _load_bank(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"error: no saved features at {path}; write them first with --dump-features")
    bank = torch.load(path, map_location="cpu", weights_only=True)
    needed = ("train_feats", "train_labels", "val_feats", "val_labels", "classes")
    missing = [k for k in needed if k not in bank]
    if missing:
        raise SystemExit(f"error: {path} lacks {', '.join(missing)}; it was not written by --dump-features")
    return bank


def _report(
    args: argparse.Namespace,
    bank: dict[str, Any],
    results: dict[int, tuple[float, float]],
    seconds: float,
    settings: dict[str, Any],
) -> None:
    n, m, c = len(bank["train_labels"]), len(bank["val_labels"]), len(bank["classes"])
    print(f"k-NN on {n} train / {m} val images, {c} classes, T={args.temperature}")
    print_table(["k", "top-1", "top-5"], [[k, t1, t5] for k, (t1, t5) in results.items()])
    if not args.output_dir:
        return
    out = Path(args.output_dir)
    write_json(
        out / RESULTS_FILE,
        {
            "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()},
            "temperature": args.temperature,
            "num_train": n,
            "num_val": m,
            "num_classes": c,
            "missing_from_train": bank.get("missing_from_train", []),
            "backbone": bank.get("backbone", {}),
            "features_seconds": seconds,
            "features_loaded": bool(args.load_features),
            "world_size": settings["world_size"],
            # With --load-features the images were embedded by an earlier run: its settings say how.
            "extraction": bank.get("extraction", settings),
            "settings": settings,
        },
    )
    scalars = [(f"knn/top1_k{k}", t1, 0) for k, (t1, _) in results.items()]
    write_scalars(out, scalars + [(f"knn/top5_k{k}", t5, 0) for k, (_, t5) in results.items()])
    print(f"results in {out / RESULTS_FILE}")


if __name__ == "__main__":
    raise SystemExit(main())
