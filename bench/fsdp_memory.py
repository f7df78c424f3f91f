"""Per-rank memory of DDP against FSDP (train.sharding) for ViT backbones with the DINO head.

Two numbers per (backbone, mode):
- computed from the model: fp32 student parameters + gradients + AdamW's two moments + the teacher, per
  rank: all of it under DDP, 1/N of it under FSDP plus what FSDP holds whole at once (the parameters and
  gradients of one unit, a block or a part of the head, and of the next one, prefetched); given for the run's
  world size and for 8 ranks (one node);
- measured on N gloo CPU processes (``torch.multiprocessing``) that build the run's modules through
  ``train.build.build_modules`` and train two steps on random crops: each rank's resident-set peak
  during the second step (bench.memory's exact accounting), which includes torch's own ~0.3-0.5 GiB.

    python -m bench.fsdp_memory --measure vit_base:ddp vit_base:fsdp vit_large_patch16_224:fsdp \\
        --json bench/results/fsdp_memory.json

Crops are small (``--crop``, one image per rank, no local crops) so activations stay far below the
parameters: the point is the state a rank keeps. On GPUs the activations are the other half of the story.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.args import add_json, write_result
from dino_train.config import Config, load_config, position_grid_size
from dino_train.models import build_student_teacher

MIB = 2**20


def bench_config(arch: str, mode: str, crop: int) -> Config:
    return load_config(None, [
        "data.path=unused", f"model.arch={arch}", "model.patch_size=16", f"data.global_crops_size={crop}",
        "data.local_crops_number=0", "data.batch_size_per_gpu=1", "train.precision=fp32",
        f"train.sharding={mode}", "train.device=cpu", "model.drop_path_rate=0",
    ])  # fmt: skip


def computed(cfg: Config, world: int) -> dict[str, float]:
    """Per-rank MiB of parameters, gradients, AdamW moments and teacher, for DDP and FSDP at ``world``."""
    with torch.device("meta"):
        student, _ = build_student_teacher(cfg.model, position_grid_size(cfg), cfg.ibot)
    total = sum(p.numel() for p in student.parameters())
    blocks = list(student.backbone.blocks)
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    head = sum(p.numel() for p in student.head.parameters())
    parts = [sum(p.numel() for p in u.parameters()) for u in student.head.children()]  # mlp, prototypes
    units = [sum(p.numel() for p in u.parameters()) for u in blocks] + parts + [total - head - in_blocks]
    state = 4 * (4 * total)  # student params, grads, two moments (fp32); teacher params: 4 * total more
    per_rank = (state + 4 * total) / world
    gathered = 4 * 2 * 2 * max(units)  # one unit's params and grads whole, and the next one prefetched
    return {
        "params_m": total / 1e6,
        "backbone_m": (total - head) / 1e6,
        "largest_unit_m": max(units) / 1e6,
        "ddp_mib": (state + 4 * total) / MIB,
        "fsdp_mib": (per_rank + gathered) / MIB,
    }


def _rank(rank: int, world: int, port: int, arch: str, mode: str, crop: int, out: str) -> None:
    from bench.memory import measure_step_memory
    from dino_train.core.schedules import StepValues
    from dino_train.runtime import distributed as D
    from dino_train.train.build import build_modules
    from dino_train.train.step import StepSettings, train_step

    torch.set_num_threads(1)
    env = D.DistEnv(rank, 0, world, "127.0.0.1", port, "bench")
    device = torch.device("cpu")
    D.init_distributed(env, device, 600)
    cfg = bench_config(arch, mode, crop)
    mods = build_modules(cfg, env, device, "fp32")
    settings = StepSettings("fp32", device, 3.0, 0, 1, D.all_reduce_sum)
    values = StepValues(1e-4, 0.04, 0.996, 0.04)
    crops = [torch.randn(1, 3, crop, crop) for _ in range(2)]
    train_step(mods, settings, crops, values, epoch=1)  # optimizer state exists from here on
    added, peak = measure_step_memory(lambda: train_step(mods, settings, crops, values, epoch=1), device)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_mib": peak, "step_added_mib": added}))
    D.cleanup()


def measured(arch: str, mode: str, world: int, crop: int) -> dict[str, float]:
    """Max over ranks of the resident-set peak during a step, and of what the step added to it (MiB)."""
    from dino_train.runtime.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, free_port(), arch, mode, crop, out), nprocs=world)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {k: max(r[k] for r in ranks) for k in ranks[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["vit_base", "vit_large_patch16_224"])
    p.add_argument("--measure", nargs="*", default=None, help="arch:mode pairs to measure (default: all)")
    p.add_argument("--world", type=int, default=2, help="processes of the measured runs (default 2)")
    p.add_argument("--crop", type=int, default=64, help="global crop size of the measured steps (px)")
    add_json(p, None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    todo = (
        args.measure if args.measure is not None else [f"{a}:{m}" for a in args.arch for m in ("ddp", "fsdp")]
    )
    rows = []
    head = ("backbone", "params", "mode", "computed/rank", "at 8 ranks", "measured peak")
    print(f"{head[0]:22} {head[1]:>8} {head[2]:5} {head[3]:>14} {head[4]:>11} {head[5]:>14}")
    for arch in args.arch:
        at_n, at_8 = (
            computed(bench_config(arch, "ddp", args.crop), args.world),
            computed(bench_config(arch, "ddp", args.crop), 8),
        )
        for mode in ("ddp", "fsdp"):
            row = {"arch": arch, "mode": mode, "world": args.world, "params_m": at_n["params_m"],
                   "computed_mib": at_n[f"{mode}_mib"], "computed_8_mib": at_8[f"{mode}_mib"]}  # fmt: skip
            if f"{arch}:{mode}" in todo:
                row.update(measured(arch, mode, args.world, args.crop))
            rows.append(row)
            peak = f"{row['peak_mib']:.0f} MiB" if "peak_mib" in row else "-"
            print(f"{arch:22} {row['params_m']:7.1f}M {mode:5} {row['computed_mib']:10.0f} MiB "
                  f"{row['computed_8_mib']:7.0f} MiB {peak:>14}", flush=True)  # fmt: skip
    if args.json:
        write_result(args.json, {"world": args.world, "crop": args.crop, "rows": rows}, 1, announce=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
