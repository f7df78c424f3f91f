"""The end of a linear-probe run (results table, saved probes, JSON) and ``--evaluate`` of a saved probe."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dino_train.data.labelled import ClassFolders
from dino_train.runtime.files import atomic_save, write_json
from eval.common import backbone_record, print_table, write_scalars
from eval.linear.model import (
    GridPoint,
    LinearGrid,
    default_variant,
    load_classifier,
    lr_for,
    save_classifier,
    topk_correct,
    variant_features,
)
from eval.linear.train import Tracker

RESULTS_FILE = "linear_results.json"
EVALUATE_FILE = "linear_evaluate.json"
CLASSIFIERS_FILE = "linear_classifiers.pth"
BEST_FILE = "linear_best.pth"


def finish(
    args: argparse.Namespace,
    out: Path,
    points: list[GridPoint],
    grid: LinearGrid,
    tracker: Tracker,
    data: ClassFolders,
    info: dict[str, Any],
    total_batch: int,
    settings: dict[str, Any],
) -> None:
    """Print the table, save every probe and the best one, write the JSON and TensorBoard scalars.

    ``settings``: ``settings_record`` of the run (every flag, the sizes used, device, world size), written
    into the JSON. Epochs are named by their 0-based index, as in the training log."""
    entries, rows = [], []
    for i, p in enumerate(points):
        last, best = tracker.last(i), tracker.best(i)
        dim = grid.heads[i].in_features
        entries.append(
            {"name": p.name, **asdict(p), "lr_scaled": lr_for(p, total_batch), "feature_dim": dim}
            | {"last": last, "best": best}
        )
        rows.append([p.name, dim, last["top1"], last["top5"], best["top1"], best["top5"], best["epoch"]])
    print_table(["probe", "dim", "last top-1", "last top-5", "best top-1", "best top-5", "best epoch"], rows)
    ib = max(range(len(points)), key=lambda i: (tracker.best(i)["top1"], -i))
    best, last = tracker.best(ib), tracker.last(ib)
    note = (
        f"best: {points[ib].name}, top-1 {best['top1']:.2f} at epoch {best['epoch']} (the highest val top-1 "
        f"over epochs and probes, chosen on val as the release reports); at the last epoch "
        f"{last['epoch']} it scores {last['top1']:.2f}"
    )
    print(note, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    every = {"points": [asdict(p) for p in points], "classes": data.classes, "last": grid.state_dict()}
    atomic_save(every | {"best": tracker.best_states, "best_index": ib}, out / CLASSIFIERS_FILE)
    head = torch.nn.Linear(grid.heads[ib].in_features, len(data.classes))
    head.load_state_dict(tracker.best_states[ib])
    # A file counts epochs completed (the release's linear checkpoints do), the JSON names the epoch.
    done = best["epoch"] + 1
    save_classifier(out / BEST_FILE, head, points[ib], data.classes, epoch=done, top1=best["top1"])
    write_json(
        out / RESULTS_FILE,
        {
            "probes": entries,
            "best": entries[ib],
            "note": note,
            "epochs": args.epochs,
            "total_batch": total_batch,
            "cached_features": args.cached_features,
            "num_classes": len(data.classes),
            "num_train": len(data.train),
            "num_val": len(data.val),
            "missing_from_train": data.missing_from_train,
            "backbone": backbone_record(info),
            "classifier": str(out / BEST_FILE),
            "settings": settings,
        },
    )
    history = zip(points, tracker.history, strict=True)
    write_scalars(out, [(f"linear/{p.name}/top1", r["top1"], r["epoch"]) for p, h in history for r in h])
    print(f"results in {out / RESULTS_FILE}, best probe in {out / BEST_FILE}", flush=True)


def evaluate_only(
    args: argparse.Namespace,
    info: dict[str, Any],
    data: ClassFolders,
    token_bank: Callable[[Any, int], tuple[torch.Tensor, torch.Tensor]],
    is_main: bool,
    settings: dict[str, Any],
) -> None:
    """Val accuracy of a saved probe; its feature layout comes from the file, else from the flags.

    ``token_bank(dataset, n)`` gives the token stacks (M, n + 1, D) and labels of a split."""
    if not args.classifier:
        raise SystemExit("error: --evaluate needs --classifier PATH")
    head, meta = load_classifier(args.classifier)
    n_default, pool_default = default_variant(int(info["embed_dim"]))
    n = int(meta.get("n_last_blocks", args.n_last_blocks[0] if args.n_last_blocks else n_default))
    flag_pool = {"auto": pool_default, "yes": True, "no": False, "both": None}[args.avgpool]
    avgpool = bool(meta.get("avgpool_patchtokens", flag_pool))
    expected = (n + avgpool) * int(info["embed_dim"])
    if head.in_features != expected:
        raise SystemExit(
            f"error: the classifier takes {head.in_features}-d features but n_last_blocks={n}, "
            f"avgpool={avgpool} on this {info['embed_dim']}-d backbone give {expected}-d; "
            "pass the --n-last-blocks/--avgpool it was trained with"
        )
    classes = meta.get("classes")
    if classes is not None and list(classes) != data.classes:
        if sorted(classes) != sorted(data.classes):
            raise SystemExit(
                f"error: the classifier's classes differ from the data's: {classes} vs {data.classes}"
            )
        order = [list(classes).index(c) for c in data.classes]  # same classes, other order: permute rows
        head.weight.data, head.bias.data = head.weight.data[order], head.bias.data[order]
    if head.out_features != len(data.classes):
        raise SystemExit(
            f"error: the classifier has {head.out_features} outputs, the data {len(data.classes)} classes"
        )
    tokens, labels = token_bank(data.val, n)
    labels = data.remap(data.val, labels)
    with torch.no_grad():
        top1, top5 = topk_correct(head(variant_features(tokens, n, avgpool)), labels)
    m = max(len(labels), 1)
    result = {
        "classifier": str(args.classifier),
        "n_last_blocks": n,
        "avgpool": avgpool,
        "num_val": len(labels),
    }
    result |= {"top1": 100.0 * top1 / m, "top5": 100.0 * top5 / m}
    if is_main:
        print_table(
            ["classifier", "top-1", "top-5"], [[Path(args.classifier).name, result["top1"], result["top5"]]]
        )
        record = {"evaluate": result, "backbone": backbone_record(info), "settings": settings}
        write_json(Path(args.output_dir) / EVALUATE_FILE, record)
