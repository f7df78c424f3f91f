"""A run report from a run's JSON-lines log: a PNG of the curves that show training health, and a short
summary (steps, images/s, best k-NN, warnings raised).

``python -m dino_train.monitor.report runs/demo [--out runs/demo/report.png]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from dino_train.runtime.cli import HelpFormatter


def read_log(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The records of ``<run_dir>/log.jsonl`` by kind (step, epoch, knn, jaccard, warning)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training output folder?")
    kinds: dict[str, list[dict[str, Any]]] = {
        "step": [],
        "epoch": [],
        "knn": [],
        "jaccard": [],
        "warning": [],
    }
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path}:{n} is not JSON (a run killed mid-write?); skipped", file=sys.stderr)
            continue
        kinds.setdefault(rec.get("kind", "step"), []).append(rec)
    return kinds


def epoch_label(index: int) -> str:
    """An epoch as the log names it (its 0-based index) and as checkpoints count it (epochs completed):
    the k-NN after the 10th epoch is "epoch 9 (10 completed)", which checkpoint0009.pth holds and whose
    ``epoch`` entry, like the eval tools' ``epochs_completed``, is 10."""
    return f"epoch {index} ({index + 1} completed)"


def summarize(kinds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    steps = kinds["step"]
    speeds = [r["images_per_s"] for r in steps if r.get("images_per_s")]
    best_knn = None
    for rec in kinds["knn"]:
        for key, value in rec.items():
            if key.startswith("knn_top1_k") and (best_knn is None or value > best_knn[1]):
                best_knn = (int(key.removeprefix("knn_top1_k")), value, rec["epoch"])
    jaccard = kinds["jaccard"]
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "last_loss": steps[-1]["loss"] if steps else None,
        "images_per_s_median": statistics.median(speeds) if speeds else None,
        "best_knn": None
        if best_knn is None
        else {"k": best_knn[0], "top1": best_knn[1], "epoch": best_knn[2]},
        "last_jaccard": None
        if not jaccard
        else {
            **dict(zip(("value", "rule"), headline_jaccard(jaccard[-1]), strict=True)),
            "per_head": jaccard[-1]["per_head"],
            "epoch": jaccard[-1]["epoch"],
            "references": jaccard[-1].get("references", {}),  # absent in logs written before them
        },
        "warnings": [w["message"] for w in kinds["warning"]],
        "skipped_files": sum(r.get("skipped_files", 0) for r in kinds["epoch"]),
    }


def headline_jaccard(record: dict[str, Any]) -> tuple[float, str]:
    """The attention Jaccard a log record leads with, and its rule's name: the paper's (best head per
    object); a log written before it holds the head-mean mask's only (``mean``)."""
    if "best_head_per_object" in record:
        return record["best_head_per_object"], "best head per object, the paper's rule"
    return record["mean"], "head-mean mask, logged before the paper's rule"


def plot(kinds: dict[str, list[dict[str, Any]]], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = kinds["step"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        ("loss", ["loss", "loss_global_global", "loss_global_local"]),
        ("learning rate", ["lr"]),
        ("teacher temperature", ["teacher_temp"]),
        (
            "teacher entropy / ln K (the gap: its information about the image)",
            ["teacher_entropy_ratio", "batch_entropy_ratio"],
        ),
        ("gradient norm", ["grad_norm", "grad_norm_backbone", "grad_norm_head"]),
    ]
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    ax = axes.flat[5]
    ks = sorted({k for r in kinds["knn"] for k in r if k.startswith("knn_top1_k")})
    for key in ks:
        ax.plot([r["step"] for r in kinds["knn"]], [r[key] for r in kinds["knn"]], marker="o", label=key)
    jaccard = kinds["jaccard"]
    if jaccard:
        ax.plot(
            [r["step"] for r in jaccard],
            [headline_jaccard(r)[0] for r in jaccard],
            marker="s",
            label=f"attention Jaccard ({headline_jaccard(jaccard[-1])[1]})",
        )
        from dino_train.measure.jaccard import PRIOR

        prior = jaccard[-1].get("references", {}).get(PRIOR)
        if prior is not None:  # what one fixed map scores: the attention must beat it to find each object
            ax.axhline(prior, linestyle="--", color="gray", label="Jaccard of the masks' mean (no model)")
    ax.set_title(
        "k-NN top-1 %" + (" and attention Jaccard %" if jaccard else "")
        if ks
        else "k-NN top-1 % (monitor.knn_data not set)"
    )
    ax.set_xlabel("step")
    if ks:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: <run_dir>/report.png)")
    args = p.parse_args(argv)
    try:
        kinds = read_log(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = summarize(kinds)
    png = plot(kinds, args.out or args.run_dir / "report.png")
    print(f"run:            {args.run_dir}")
    loss = s["last_loss"]
    print(f"steps:          {s['steps']}" + (f"  (last loss {loss:.4f})" if loss is not None else ""))
    ips = s["images_per_s_median"]
    print(f"images/s:       {ips:.1f} (median over logged steps)" if ips else "images/s:       -")
    knn = s["best_knn"]
    print(
        f"best k-NN:      {knn['top1']:.1f}% (k={knn['k']}, {epoch_label(knn['epoch'])})"
        if knn
        else "best k-NN:      -"
    )
    jac = s["last_jaccard"]
    if jac:
        print(f"attention Jaccard: {jac['value']:.1f}% ({jac['rule']}, {epoch_label(jac['epoch'])})")
        if jac["references"]:
            from dino_train.measure.jaccard import describe_references

            print(f"                   {describe_references(jac['references'])}")
    print(f"skipped images: {s['skipped_files']}")
    print(f"warnings:       {len(s['warnings'])}")
    for w in s["warnings"]:
        print(f"  - {w}")
    print(f"report:         {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
