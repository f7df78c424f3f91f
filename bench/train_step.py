"""Benchmark of the DINO training step: images/s, peak memory, counted FLOPs and model FLOP utilisation
(the step's FLOP/s over the machine's matmul peak measured in the same run), on random tensors (the model
step alone) or through the real multi-crop data loader.

``python -m bench.train_step --arch vit_small --patch 16 --batch 16 --precision bf16 fp32 --compile off on
--attention fused explicit`` prints a table and writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench.device import pick_device
from bench.flops import count_flops, matmul_peak
from bench.memory import peak_mib, reset_peak, rss_mib
from dino_train.build import build_modules
from dino_train.config import load_config
from dino_train.distributed import DistEnv
from dino_train.engine import train_step
from dino_train.schedules import StepValues

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--attention", nargs="+", default=["fused"], choices=["fused", "explicit"])
    p.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")
    p.add_argument("--steps", type=int, default=3, help="timed steps after warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--data", default="", help="a folder of images: time through the real loader instead")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", type=Path, default=RESULTS / "train_step.json")
    return p.parse_args(argv)


def _modules(
    args: argparse.Namespace, precision: str, device: torch.device, compiled: bool, ckpt: bool, attention: str
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
    cfg = load_config(None, overrides)
    return cfg, build_modules(cfg, DistEnv(), device, precision)


def _batches(args: argparse.Namespace, cfg, device: torch.device):
    if args.data:
        from dino_train.build import build_loader

        loader, _ = build_loader(cfg, DistEnv(), device)
        while True:
            for crops, _, _ in loader:
                yield [c.to(device, non_blocking=True) for c in crops]
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch, 3, s, s, device=device) for s in sizes]
    while True:
        yield crops


def run_one(args, precision: str, compiled: bool, attention: str, ckpt: bool, device, peaks) -> dict:
    cfg, mods = _modules(args, precision, device, compiled, ckpt, attention)
    values = StepValues(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04)
    batches = _batches(args, cfg, device)
    data_time = [0.0]

    def step() -> None:
        t = time.perf_counter()
        crops = next(batches)
        data_time[0] += time.perf_counter() - t
        train_step(
            mods,
            crops,
            values,
            epoch=5,
            precision=precision,
            device=device,
            clip_grad=3.0,
            freeze_last_layer=1,
        )

    for _ in range(args.warmup):
        step()
    flops = count_flops(step)  # one more step, counted (not timed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    reset_peak(device)
    base = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib()
    data_time[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    return {
        "arch": f"{args.arch}/{args.patch}",
        "precision": precision,
        "compile": compiled,
        "attention": attention,
        "checkpointing": ckpt,
        "batch": args.batch,
        "crops": f"2x{args.global_size}+{args.local_crops}x{args.local_size}",
        "source": "loader" if args.data else "random",
        "step_s": dt,
        "data_s": data_time[0] / args.steps,
        "images_per_s": args.batch / dt,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / dt / 1e9,
        "peak_gflops": peaks[precision] / 1e9,
        "mfu": flops / dt / peaks[precision],
        "peak_mib": peak_mib(device),
        # What the step itself adds above the memory held between steps (weights, optimizer state).
        "step_peak_mib": peak_mib(device) - base,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device, args.threads)
    peaks = {p: matmul_peak(DTYPES[p], device) for p in args.precision}
    grid = itertools.product(args.precision, args.compile, args.attention, args.checkpointing)
    rows = [run_one(args, p, c == "on", a, k == "on", device, peaks) for p, c, a, k in grid]
    head = (
        f"{'arch':<14}{'prec':<6}{'compile':<8}{'attention':<10}{'ckpt':<6}{'batch':>6}  {'crops':<14}"
        f"{'step s':>8}{'data s':>8}{'img/s':>8}{'GFLOP/s':>9}{'peak':>8}{'MFU':>6}{'MiB':>7}{'step MiB':>9}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['arch']:<14}{r['precision']:<6}{str(r['compile']):<8}{r['attention']:<10}"
            f"{str(r['checkpointing']):<6}{r['batch']:>6}  {r['crops']:<14}"
            f"{r['step_s']:>8.3f}{r['data_s']:>8.3f}"
            f"{r['images_per_s']:>8.1f}{r['achieved_gflops']:>9.1f}{r['peak_gflops']:>8.0f}{r['mfu']:>6.0%}"
            f"{r['peak_mib']:>7.0f}{r['step_peak_mib']:>9.0f}"
        )
    meta = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "matmul_peak_gflops": {p: v / 1e9 for p, v in peaks.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
