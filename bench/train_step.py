"""Benchmark of the DINO training step: images/s and peak memory, on random tensors (the model step
alone) or through the real multi-crop data loader.

``python -m bench.train_step --arch vit_small --patch 16 --batch 16 --precision bf16 fp32``
prints a table and writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench.memory import peak_mib, reset_peak
from dino_train.build import build_modules
from dino_train.config import load_config
from dino_train.distributed import DistEnv
from dino_train.engine import train_step
from dino_train.schedules import StepValues

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--global-crops", type=int, default=2, help="only 2 is DINO; kept for symmetry")
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")
    p.add_argument("--steps", type=int, default=5, help="timed steps after warmup")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", default="", help="a folder of images: time through the real loader instead")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", type=Path, default=RESULTS / "train_step.json")
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, precision: str, device: torch.device) -> dict:
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
        "optim.warmup_epochs=0",
    ]
    cfg = load_config(None, overrides)
    mods = build_modules(cfg, DistEnv(), device, precision)
    values = StepValues(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops

    if args.data:
        from dino_train.data import MultiCropAugmentation, build_pretrain_loader

        d = cfg.data
        aug = MultiCropAugmentation(
            d.global_crops_size,
            d.global_crops_scale,
            d.local_crops_number,
            d.local_crops_size,
            d.local_crops_scale,
        )
        loader, _ = build_pretrain_loader(
            args.data, aug, args.batch, args.workers, 0, 0, 1, device.type == "cuda"
        )

        def batches():
            while True:
                for crops, _ in loader:
                    yield [c.to(device, non_blocking=True) for c in crops]
    else:

        def batches():
            crops = [torch.randn(args.batch, 3, s, s, device=device) for s in sizes]
            while True:
                yield crops

    it = batches()

    def step() -> None:
        train_step(
            mods,
            next(it),
            values,
            epoch=5,
            precision=precision,
            device=device,
            clip_grad=3.0,
            freeze_last_layer=1,
        )

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    return {
        "arch": f"{args.arch}/{args.patch}",
        "precision": precision,
        "batch": args.batch,
        "crops": f"2x{args.global_size}+{args.local_crops}x{args.local_size}",
        "source": "loader" if args.data else "random",
        "step_s": dt,
        "images_per_s": args.batch / dt,
        "peak_mib": peak_mib(device),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    rows = [run_one(args, p, device) for p in args.precision]
    header = (
        f"{'arch':<14}{'precision':<10}{'batch':>6}  {'crops':<14}{'source':<8}"
        f"{'step s':>8}{'img/s':>9}{'peak MiB':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['arch']:<14}{r['precision']:<10}{r['batch']:>6}  {r['crops']:<14}{r['source']:<8}"
            f"{r['step_s']:>8.3f}{r['images_per_s']:>9.1f}{r['peak_mib']:>10.0f}"
        )
    meta = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
