"""One row of the step benchmark (``bench.train_step``): the modules of one configuration built from the
recipe and the flags, its steps timed on random crops or through the real loader, the FLOPs of one more
step counted and its memory measured last. ``bench.train_step`` spans the grid and runs each row in its
own process; ``bench.step_table`` compares the rows and prints them."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator

import torch

from bench.flops import count_flops
from bench.memory import measure_step_memory
from dino_train.config import Config, load_config
from dino_train.core.schedules import StepValues
from dino_train.runtime.distributed import DistEnv
from dino_train.train.build import build_modules
from dino_train.train.step import StepSettings, TrainModules, train_step

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


def combo_settings(combo: tuple[str, ...]) -> tuple[str, bool, str, bool, str]:
    """(precision, compiled, attention, checkpointing, augment) of :func:`run_one` from a grid
    combination (the flags' strings, as a child process gets them in ``--row``)."""
    precision, compiled, attention, ckpt, augment = combo
    return precision, compiled == "on", attention, ckpt == "on", augment


def _modules(
    args: argparse.Namespace,
    precision: str,
    device: torch.device,
    compiled: bool,
    ckpt: bool,
    attention: str,
    augment: str,  # "": the recipe's data.augment_device
) -> tuple[Config, TrainModules]:
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


def _batches(args: argparse.Namespace, cfg: Config, device: torch.device) -> Iterator[list[torch.Tensor]]:
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
    args: argparse.Namespace,
    precision: str,
    compiled: bool,
    attention: str,
    ckpt: bool,
    augment: str,
    device: torch.device,
    peaks: dict[str, float],
) -> dict:
    """The row of one configuration: step and data seconds, images/s, FLOPs and MFU against the matmul
    ``peaks`` (FLOP/s per precision), peak memory."""
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


def profile_step(step: Callable[[], None], device: torch.device, top: int) -> None:
    """Where one step's time goes, by operator (self time), to see what dominates it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=top), flush=True)
