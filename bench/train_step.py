"""Benchmark of the DINO training step: images/s, peak memory, counted FLOPs and model FLOP utilisation
(the step's FLOP/s over the machine's matmul peak measured in the same run), on random tensors (the model
step alone) or through the real multi-crop data loader.

``python -m bench.train_step --arch vit_small --patch 16 --batch 16 --precision bf16 fp32 --compile off on
--attention fused explicit`` prints a table and writes bench/results/train_step.json; ``--recipe
configs/demo.yaml`` takes the model and crops from a recipe instead.

Each configuration runs in a fresh process (``--no-isolate`` runs them in this one), so one row's memory
does not carry into the next. Memory is measured on one extra step after the timed ones, with exact CPU
accounting switched on only then (bench.memory explains why: it would slow the timed steps).

``--rounds N`` runs the whole grid N times, in alternating order (forwards, then backwards, ...), and
reports each row's median step time, with the speed-ups of every round in the JSON and under the table:
on a shared 2-core VM one row's time drifts by up to 25% from minute to minute, and a ratio of two rows
timed minutes apart drifts with it.

Two derived columns compare rows of one run: ``mem x`` is the step's peak over that of the same row with
explicit attention, and ``vs ref`` is the speed-up over the release-equivalent step (fp32, explicit
softmax attention, eager; through the loader, with the release's PIL augmentation when ``--augment``
lists ``pil``), when those rows are in the grid. So the whole training loop against the release's:

    python -m bench.train_step --recipe configs/demo.yaml --data data/embedded/train --workers 0 \
        --precision bf16 fp32 --attention explicit --augment auto pil --steps 60 --warmup 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.args import RESULTS, add_device, add_json, add_threads, pick_bench_device, write_result
from bench.step_row import combo_settings, resolve_shape, run_one
from bench.step_table import add_comparisons, merge_rounds, print_rounds, print_table
from dino_train.runtime.precision import DTYPES, matmul_flops


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=None, help="a recipe yaml for the model and crops")
    p.add_argument("--arch", default=None, help="default: the recipe's, else vit_small")
    p.add_argument("--patch", type=int, default=None, help="default: the recipe's, else 16")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: recipe's, else 16)")
    p.add_argument("--global-size", type=int, default=None, help="default: the recipe's, else 224")
    p.add_argument("--local-size", type=int, default=None, help="default: the recipe's, else 96")
    p.add_argument("--local-crops", type=int, default=None, help="default: the recipe's, else 10")
    p.add_argument("--out-dim", type=int, default=None, help="default: the recipe's, else 65536")
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--attention", nargs="+", default=["fused"], choices=["fused", "explicit"])
    p.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"])
    add_threads(p)
    p.add_argument("--steps", type=int, default=3, help="timed steps after warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--data", default="", help="a folder of images: time through the real loader instead")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--augment",
        nargs="+",
        default=None,
        choices=["auto", "cpu", "cuda", "pil"],
        help="data.augment_device of the loader, with --data (default: the recipe's; pil: the release's)",
    )
    add_device(p)
    add_json(p, RESULTS / "train_step.json")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="print the N operators that take the most time in one more step (torch.profiler)",
    )
    p.add_argument("--no-isolate", action="store_true", help="run every configuration in this process")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the grid this many times in alternating order and report medians (see above)",
    )
    p.add_argument("--row", default="", help=argparse.SUPPRESS)  # internal: one configuration, in a child
    p.add_argument("--peaks", default="", help=argparse.SUPPRESS)  # internal: the parent's matmul peaks
    return p.parse_args(argv)


def run_isolated(argv: list[str], combo: tuple[str, ...], peaks: dict[str, float]) -> dict:
    """One configuration in a fresh interpreter; its row comes back through a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "bench.train_step", *argv, "--row", ",".join(combo)]
        cmd += ["--peaks", json.dumps(peaks), "--json", str(out)]
        done = subprocess.run(cmd, check=False)
        if done.returncode:
            raise SystemExit(f"bench.train_step: configuration {combo} failed (exit {done.returncode})")
        return json.loads(out.read_text())["rows"][0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"bench.train_step: --rounds must be at least 1, got {args.rounds}")
    if args.rounds > 1 and args.no_isolate:
        # The first row's memory measurement leaves exact CPU accounting on in this process (bench.memory),
        # which slows every later row: rounds would compare unequal runs.
        raise SystemExit("bench.train_step: --rounds needs isolated runs (drop --no-isolate)")
    resolve_shape(args)
    device = pick_bench_device(args)
    if args.peaks:
        peaks = json.loads(args.peaks)
    else:
        peaks = {p: matmul_flops(DTYPES[p], device) for p in args.precision}
    if args.row:
        combos = [tuple(args.row.split(","))]
    else:
        if args.augment and not args.data:
            raise SystemExit("bench.train_step: --augment needs --data (random tensors are not augmented)")
        augments = args.augment or [""]  # "": the recipe's data.augment_device
        combos = list(
            itertools.product(args.precision, args.compile, args.attention, args.checkpointing, augments)
        )
    base = _strip(argv, _GRID_OPTIONS)  # what a child gets: everything but the grid

    def measure(combo: tuple[str, ...]) -> dict:
        if args.row or args.no_isolate:
            return run_one(args, *combo_settings(combo), device, peaks)
        return run_isolated(base, combo, peaks)

    rounds = []
    for r in range(args.rounds):  # a child (--row) gets no --rounds: one
        order = combos if r % 2 == 0 else combos[::-1]  # alternate, so a slow drift hits every row alike
        by_combo = {combo: measure(combo) for combo in order}
        rounds.append([by_combo[c] for c in combos])
        add_comparisons(rounds[-1])
    rows = merge_rounds(rounds)
    if not args.row:
        print_table(rows)
        print_rounds(rows)
    meta = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "isolated": not args.no_isolate,
        "rounds": len(rounds),
        "load_avg_at_end": os.getloadavg(),
        "matmul_peak_gflops": {p: v / 1e9 for p, v in peaks.items()},
    }
    write_result(args.json, {"meta": meta, "rows": rows}, announce=not args.row)
    return 0


# The options that span the grid (a child process gets one combination of them as --row instead).
_GRID_OPTIONS = {
    "--json", "--precision", "--compile", "--attention", "--checkpointing", "--augment", "--rounds",
}  # fmt: skip


def _strip(argv: list[str], options: set[str]) -> list[str]:
    """argv without the given options and their values (the child gets one configuration instead)."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=")[0] in options
            if skipping and "=" in a:
                skipping = False
                continue
        if not skipping:
            out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
