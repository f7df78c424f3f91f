"""Search recipes honestly: train each of a list of short configs one after another on this machine (a
process each, alone on the cores), then score every teacher on the held-out split the same way.

    python -m bench.recipes --config configs/demo.yaml --data data/embedded \\
        --recipe release= --recipe koleo="dino.koleo_weight=0.1" --recipe ibot="ibot.loss_weight=1.0"

Per recipe: steps, training seconds and steps/s; the loss and the teacher's entropy (fraction of ln K) at
a quarter, half and the end of the run; k-NN (k = 10, 20), the linear probe and the attention Jaccard on
``<data>/val`` (``eval.scorecard``: the paper's rule, apart over brighter and darker objects, and the
head-mean mask's); and a random backbone of the first recipe's shape as the floor.
Prints a table and writes bench/results/recipes.json (rows appended as each recipe finishes, so an
interrupted sweep keeps what it measured; ``--resume`` skips recipes already there).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.args import RESULTS, add_json, write_result


def _curve(log: Path, key: str) -> list[float | None]:
    """``key`` of the logged steps at 25%, 50%, 75% and 100% of the run."""
    steps = [json.loads(x) for x in log.read_text().splitlines() if '"kind": "step"' in x]
    if not steps:
        return [None] * 4
    return [steps[min(len(steps) - 1, round(f * len(steps)) - 1)].get(key) for f in (0.25, 0.5, 0.75, 1.0)]


def run_one(args: argparse.Namespace, name: str, overrides: list[str]) -> dict:
    """Train one recipe in a child process, then score its teacher here."""
    import torch

    from dino_train.config import knn_sizes, load_config
    from dino_train.models.loading import load_backbone
    from eval.scorecard import score_backbone

    out = Path(args.out) / name
    if out.exists():  # a recipe's folder holds only its latest run (logs would otherwise mix)
        shutil.rmtree(out)
    cmd = [sys.executable, "dino_train/main.py", "--config", str(args.config)]
    cmd += [f"data.path={Path(args.data) / 'train'}", f"train.output_dir={out}", "train.resume=false"]
    cmd += ["train.progress_bar=false", *overrides]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out / "recipe.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "recipe.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"name": name, "overrides": overrides, "error": done.stderr.strip().splitlines()[-1:]}
    model, _ = load_backbone(out / "checkpoint.pth")
    torch.manual_seed(0)
    size = knn_sizes(load_config(out / "config.yaml"))[1]  # what the recipe's own k-NN monitor sees
    log = out / "log.jsonl"
    steps = _curve(log, "step")[-1] or 0
    return {
        "name": name,
        "overrides": overrides,
        "steps": steps,
        "seconds": round(seconds, 1),
        "steps_per_s": round(steps / seconds, 3),
        "loss": _curve(log, "loss"),
        "teacher_entropy_ratio": _curve(log, "teacher_entropy_ratio"),
        "warnings": sum('"kind": "warning"' in x for x in log.read_text().splitlines()),
        **score_backbone(model, args.data, size),
    }


def random_row(args: argparse.Namespace, overrides: list[str]) -> dict:
    """The floor: a randomly initialised backbone of the recipe's shape, scored the same way."""
    import torch

    from dino_train.config import ConfigError, knn_sizes, load_config
    from dino_train.models import build_from_spec
    from dino_train.train.spec import run_spec
    from eval.scorecard import score_backbone

    try:
        cfg = load_config(args.config, [f"data.path={args.data}", *overrides])
    except ConfigError as e:  # the recipe's own run will say the same; the sweep goes on
        return {"name": "random init", "overrides": overrides, "error": [str(e)]}
    torch.manual_seed(cfg.train.seed + 1)
    model = build_from_spec(run_spec(cfg)).eval()
    return {
        "name": "random init",
        "overrides": overrides,
        **score_backbone(model, args.data, knn_sizes(cfg)[1]),
    }


def _fmt(v: object) -> str:
    if isinstance(v, list):
        return "/".join("-" if x is None else f"{x:.2f}" for x in v)
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict], only_present: bool = False) -> None:
    """The sweep's table; ``only_present``: without the columns no row has (bench.transfer's rows have
    no training columns)."""
    from eval.scorecard import (  # with the scores, which loaded torch already
        JACCARD,
        JACCARD_BRIGHTER,
        JACCARD_DARKER,
        JACCARD_HEAD_MEAN,
    )

    cols = ["name", "steps", "seconds", "loss", "teacher_entropy_ratio", "k-NN k=20", "linear probe",
            JACCARD, JACCARD_BRIGHTER, JACCARD_DARKER, JACCARD_HEAD_MEAN,
            "warnings"]  # fmt: skip
    cols = [c for c in cols if not only_present or any(c in r for r in rows)]
    cells = [[_fmt(r.get(c, "-")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="the base recipe")
    p.add_argument("--data", type=Path, default=Path("data/embedded"), help="train/, val/ (and val_masks/)")
    p.add_argument("--recipe", action="append", default=[], metavar='NAME="k=v k=v"', help="repeatable")
    p.add_argument("--out", type=Path, default=Path("runs/recipes"), help="one training folder per recipe")
    add_json(p, RESULTS / "recipes.json")
    p.add_argument("--resume", action="store_true", help="keep rows of --json and skip their recipes")
    p.add_argument("--no-random", action="store_true", help="skip the random-init floor")
    args = p.parse_args(argv)
    # shlex: an override may hold spaces when quoted, e.g. 'model.timm_kwargs="{depth: 6}"'.
    recipes = [(r.split("=", 1)[0], shlex.split(r.split("=", 1)[1]) if "=" in r else []) for r in args.recipe]
    if not recipes:
        p.error('give at least one --recipe NAME="overrides"')
    rows = json.loads(args.json.read_text()) if args.resume and args.json.is_file() else []
    todo = [(n, o) for n, o in recipes if n not in {r["name"] for r in rows}]
    if not args.no_random and not any(r["name"] == "random init" for r in rows):
        todo.insert(0, ("random init", recipes[0][1]))
    for name, overrides in todo:
        print(f"== {name}: {' '.join(overrides) or '(base recipe)'}", flush=True)
        rows.append(random_row(args, overrides) if name == "random init" else run_one(args, name, overrides))
        write_result(args.json, rows, announce=False)
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
