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
import time
from pathlib import Path

import torch

from bench.flops import count_flops
from bench.memory import measure_step_memory
from bench.step_table import add_comparisons, merge_rounds, print_rounds, print_table
from dino_train.config import load_config
from dino_train.core.schedules import StepValues
from dino_train.runtime.device import pick_device
from dino_train.runtime.distributed import DistEnv
from dino_train.runtime.precision import DTYPES, matmul_flops
from dino_train.train.build import build_modules
from dino_train.train.step import StepSettings, train_step

RESULTS = Path(__file__).resolve().parent / "results"


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
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")
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
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", type=Path, default=RESULTS / "train_step.json")
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


# Without a recipe: the paper's ViT-S/16 multi-crop step with the release's head.
_PLAIN = {"arch": "vit_small", "patch": 16, "batch": 16, "global_size": 224, "local_size": 96,
          "local_crops": 10, "out_dim": 65536}  # fmt: skip
_RECIPE_KEYS = {
    "arch": "model.arch",
    "patch": "model.patch_size",
    "batch": "data.batch_size_per_gpu",
    "global_size": "data.global_crops_size",
    "local_size": "data.local_crops_size",
    "local_crops": "data.local_crops_number",
    "out_dim": "model.out_dim",
}


def resolve_shape(args: argparse.Namespace) -> None:
    """Fill the model and crop arguments left unset from the recipe (or the plain ViT-S/16 step)."""
    base = load_config(args.recipe, []) if args.recipe else None
    for name, key in _RECIPE_KEYS.items():
        if getattr(args, name) is None:
            section, field = key.split(".")
            value = getattr(getattr(base, section), field) if base else _PLAIN[name]
            setattr(args, name, value)


def _modules(
    args: argparse.Namespace,
    precision: str,
    device: torch.device,
    compiled: bool,
    ckpt: bool,
    attention: str,
    augment: str,  # "": the recipe's data.augment_device
):
    overrides = [
        f"model.arch={args.arch}",
        f"model.patch_size={args.patch}",
        f"model.out_dim={args.out_dim}",
        f"data.path={args.data or 'random'}",
        f"data.batch_size_per_gpu={args.batch}",
        f"data.global_crops_size={args.global_size}",
        f"data.local_crops_size={args.local_size}",
        f"data.local_crops_number={args.local_crops}",
        f"data.num_workers={args.workers}",
        f"train.precision={precision}",
        f"train.compile={str(compiled).lower()}",
        f"train.grad_checkpointing={str(ckpt).lower()}",
        f"train.fused_attention={attention}",
        "optim.warmup_epochs=0",
    ]
    if augment:  # else the recipe's (or the default's)
        overrides.append(f"data.augment_device={augment}")
    cfg = load_config(args.recipe, overrides)
    return cfg, build_modules(cfg, DistEnv(), device, precision)


def _batches(args: argparse.Namespace, cfg, device: torch.device):
    if args.data:
        from dino_train.data import crops_to_device
        from dino_train.train.build import build_loader

        loader, _ = build_loader(cfg.data, cfg.train.seed, DistEnv(), device)
        while True:
            for crops, _, _ in loader:
                yield crops_to_device(crops, device)  # finishes RawCrops (augment_device=cuda) too
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch, 3, s, s, device=device) for s in sizes]
    while True:
        yield crops


def run_one(
    args, precision: str, compiled: bool, attention: str, ckpt: bool, augment: str, device, peaks
) -> dict:
    cfg, mods = _modules(args, precision, device, compiled, ckpt, attention, augment)
    values = StepValues(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04)
    settings = StepSettings(precision, device, clip_grad=3.0, freeze_last_layer=1)
    batches = _batches(args, cfg, device)
    data_time = [0.0]

    def step() -> None:
        t = time.perf_counter()
        crops = next(batches)
        data_time[0] += time.perf_counter() - t
        train_step(mods, settings, crops, values, epoch=5)

    # Compiled: the first calls compile per resolution and grad mode, then recompile once with dynamic
    # batch sizes; timing starts after those.
    for _ in range(args.warmup + (2 if compiled else 0)):
        step()
    flops = count_flops(step)  # one more step, counted (not timed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    data_time[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    data_s = data_time[0] / args.steps
    if args.profile:
        profile_step(step, device, args.profile)
    step_peak, peak = measure_step_memory(step, device)
    return {
        "recipe": args.recipe.stem if args.recipe else "",
        "arch": f"{args.arch}/{args.patch}",
        "precision": precision,
        "compile": compiled,
        "attention": attention,
        "checkpointing": ckpt,
        "augment": (augment or cfg.data.augment_device) if args.data else "random",
        "batch": args.batch,
        "crops": f"2x{args.global_size}+{args.local_crops}x{args.local_size}",
        "source": "loader" if args.data else "random",
        "step_s": dt,
        "data_s": data_s,
        "images_per_s": args.batch / dt,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / dt / 1e9,
        "peak_gflops": peaks[precision] / 1e9,
        "mfu": flops / dt / peaks[precision],
        "peak_mib": peak,
        # What the step itself adds above the memory held between steps (weights, optimizer state).
        "step_peak_mib": step_peak,
    }


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


def profile_step(step, device: torch.device, top: int) -> None:
    """Where one step's time goes, by operator (self time), to see what dominates it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=top), flush=True)


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
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
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
            return run_one(args, *_combo_settings(combo), device, peaks)
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
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if not args.row:
        print(f"wrote {args.json}")
    return 0


# The options that span the grid (a child process gets one combination of them as --row instead).
_GRID_OPTIONS = {
    "--json", "--precision", "--compile", "--attention", "--checkpointing", "--augment", "--rounds",
}  # fmt: skip


def _combo_settings(combo: tuple[str, ...]) -> tuple:
    """(precision, compiled, attention, checkpointing, augment) of run_one from a grid combination."""
    precision, compiled, attention, ckpt, augment = combo
    return precision, compiled == "on", attention, ckpt == "on", augment


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
