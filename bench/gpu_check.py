"""One short check of the CUDA paths (under 5 minutes on an H100/H200), for a machine lent for minutes:

- the ViT-S/16 training step at the paper's shape (2x224 + 10x96, 65536 prototypes, fused attention):
  bf16 eager, bf16 compiled, fp16 eager with the GradScaler (CUDA only); images/s, peak memory, MFU
  against the GPU's dense bf16 peak (looked up by name, or ``--peak-tflops``);
- NCCL at world size 1 (a process group, an all-reduce and a broadcast);
- faiss-gpu k-NN (exact search, checked against the CPU index) when faiss has GPU support;
- the tensor augmentation: uint8 crops cut on one CPU core, photometric ops on the GPU, against the
  step's images/s (the loader workers a GPU needs follow from it).

``python -m bench.gpu_check`` on the GPU machine writes $OUT/gpu_check.json (else
bench/results/gpu_check.json) and prints a table; ``--device cpu --quick`` runs the same parts at a tiny
shape on the CPU (gloo instead of NCCL), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.args import RESULTS, add_json, write_result
from bench.data_pipeline import make_jpegs
from bench.flops import count_flops
from dino_train.config import load_config
from dino_train.core.schedules import StepValues
from dino_train.data import TensorMultiCrop, crops_to_device
from dino_train.data.loader import collate_raw_crops
from dino_train.data.tensor_augment import load_rgb_draft
from dino_train.runtime.distributed import DistEnv, free_port
from dino_train.runtime.precision import DTYPES, matmul_flops
from dino_train.train.build import build_modules
from dino_train.train.step import StepOutput, StepSettings, train_step

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the first name
# contained in the device's name wins, so the PCIe and NVL parts come before the plain H100.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0), ("L4", 121.0),
)  # fmt: skip
PAPER = {"arch": "vit_small", "global": 224, "local": 96, "locals": 10, "out_dim": 65536}
QUICK = {"arch": "vit_tiny", "global": 64, "local": 32, "locals": 4, "out_dim": 1024}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="a ViT-Ti/16 at the demo's shape, no compile")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 64, quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10, quick 2)")
    p.add_argument("--compile", default="on", choices=["on", "off"], help="the compiled bf16 row")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; 0: look it up")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    add_json(p, out / "gpu_check.json")
    args = p.parse_args(argv)
    args.shape = QUICK if args.quick else PAPER
    args.batch = args.batch or (4 if args.quick else 64)
    args.steps = args.steps or (2 if args.quick else 10)
    return args


def bf16_peak(device: torch.device, override: float) -> tuple[float, str]:
    """(FLOP/s, where the number comes from): the argument, the data-sheet table, else a measurement."""
    if override:
        return override * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in BF16_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"data sheet ({key})"
    return matmul_flops(torch.bfloat16, device), "measured bf16 matmul"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _modules(args: argparse.Namespace, precision: str, compiled: bool, device: torch.device):
    s = args.shape
    overrides = [
        f"model.arch={s['arch']}", "model.patch_size=16", f"model.out_dim={s['out_dim']}", "data.path=random",
        f"data.batch_size_per_gpu={args.batch}", f"data.global_crops_size={s['global']}",
        f"data.local_crops_size={s['local']}", f"data.local_crops_number={s['locals']}",
        f"train.precision={precision}", f"train.compile={str(compiled).lower()}",
        "train.fused_attention=fused", "optim.warmup_epochs=0",
    ]  # fmt: skip
    return build_modules(load_config(None, overrides), DistEnv(), device, precision)


def _timed(step: Callable[[], StepOutput], n: int, device: torch.device) -> tuple[float, StepOutput]:
    """(seconds for ``n`` calls of ``step``, waiting for the device, the last call's output)."""
    t = time.perf_counter()
    for _ in range(n):
        out = step()
    _sync(device)
    return time.perf_counter() - t, out


def step_row(
    args: argparse.Namespace, precision: str, compiled: bool, device: torch.device, peak: float, flops: dict
) -> dict:
    """One training step configuration: images/s, peak memory, MFU against ``peak`` FLOP/s. ``flops``
    caches the step's counted FLOPs: counted on the first (eager) row, the same maths for the others
    (counting under a compiled model could recompile it)."""
    mods = _modules(args, precision, compiled, device)
    s = args.shape
    sizes = [s["global"]] * 2 + [s["local"]] * s["locals"]
    crops = [torch.randn(args.batch, 3, n, n, device=device) for n in sizes]
    values = StepValues(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04)
    settings = StepSettings(precision, device, clip_grad=3.0, freeze_last_layer=0)
    step = lambda: train_step(mods, settings, crops, values, epoch=1)  # noqa: E731
    warmup_s, out = _timed(step, 3 if compiled else 1, device)  # compiled: per resolution, dynamic
    if "step" not in flops:
        flops["step"] = count_flops(step)
    n_flops = flops["step"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dt, out = _timed(step, args.steps, device)
    dt /= args.steps
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "part": "step", "precision": precision, "compile": compiled, "scaler": mods.scaler is not None,
        "step_s": dt, "images_per_s": args.batch / dt, "tflops": n_flops / dt / 1e12,
        "mfu": n_flops / dt / peak,
        "peak_mib": peak_mib, "warmup_s": warmup_s, "loss": float(out.loss), "applied": out.applied,
    }  # fmt: skip


def nccl_row(device: torch.device) -> dict:
    """A world-size-1 process group on NCCL (gloo on the CPU): all-reduce and broadcast round trips."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        x = torch.full((16 * 2**20,), 2.0, device=device)  # 64 MiB
        dist.all_reduce(x)
        dist.broadcast(x, src=0)
        _sync(device)
        t = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(x)
        _sync(device)
        ok = bool((x == 2.0).all())
        return {
            "part": "collectives",
            "backend": backend,
            "ok": ok,
            "all_reduce_ms": (time.perf_counter() - t) * 100,
        }
    finally:
        dist.destroy_process_group()


def knn_row(quick: bool) -> dict:
    """Exact top-20 search of 10k queries in 50k features (dim 384): GPU index against the CPU one."""
    from dino_train.measure.knn import faiss_has_gpu, faiss_topk

    n, m = (2000, 200) if quick else (50000, 10000)
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(n, 384, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(m, 384, generator=g), dim=1)
    gpu = faiss_has_gpu()
    t = time.perf_counter()
    sims, _ = faiss_topk(train, queries, 20, use_gpu=gpu)
    search_s = time.perf_counter() - t
    ref, _ = faiss_topk(train, queries[:500], 20, use_gpu=False)
    agree = bool(torch.allclose(sims[:500], ref, atol=1e-4))
    return {"part": "knn", "faiss_gpu": gpu, "search_s": search_s, "queries_per_s": m / search_s, "ok": agree}


def augment_row(args: argparse.Namespace, device: torch.device, step_images_per_s: float | None) -> dict:
    """Cut uint8 crops on one CPU core (per image), finish them on ``device`` (per batch)."""
    s = args.shape
    augment = TensorMultiCrop(s["global"], (0.4, 1.0), s["locals"], s["local"], (0.05, 0.4))
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.batch, size=(500, 375))
        images = [load_rgb_draft(p, augment.min_short_side) for p in paths]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    raw, _, _ = collate_raw_crops([(augment(im), 0, 0) for im in images])
    cut_per_core = len(images) / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    pinned = [c._replace(pixels=c.pixels.pin_memory()) if device.type == "cuda" else c for c in raw]
    crops_to_device(pinned, device)  # warm-up
    _sync(device)
    t = time.perf_counter()
    for _ in range(10):
        crops_to_device(pinned, device)
    _sync(device)
    finish = 10 * len(images) / (time.perf_counter() - t)
    row = {"part": "augment", "cut_images_per_s_per_core": cut_per_core, "finish_images_per_s": finish}
    if step_images_per_s:
        row["finish_above_step"] = finish > step_images_per_s
        row["cpu_cores_to_feed_step"] = step_images_per_s / cut_per_core
    return row


def _guarded(rows: list[dict], name: str, fn: Callable[[], dict]) -> None:
    """Run one part; a failure is recorded (and printed) and the other parts still run."""
    t = time.perf_counter()
    try:
        row = fn()
    except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others' numbers
        traceback.print_exc()
        row = {"part": name, "error": f"{type(err).__name__}: {err}"}
    row["seconds"] = time.perf_counter() - t
    rows.append(row)
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench.gpu_check: no CUDA device here; pass --device cpu --quick to check the script"
        )
    device = torch.device(args.device)
    peak, peak_source = bf16_peak(device, args.peak_tflops)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: OpenMP's spinning threads slow tiny ops down
    combos = [("bf16", False)]
    if args.compile == "on" and not args.quick:
        combos.append(("bf16", True))
    if device.type == "cuda":  # CPUs without fp16 units emulate it: minutes per step
        combos.append(("fp16", False))
    rows: list[dict] = []
    flops: dict = {}
    for precision, compiled in combos:
        _guarded(rows, "step", lambda p=precision, c=compiled: step_row(args, p, c, device, peak, flops))
    best = max((r.get("images_per_s", 0.0) for r in rows), default=0.0)
    _guarded(rows, "collectives", lambda: nccl_row(device))
    _guarded(rows, "knn", lambda: knn_row(args.quick))
    _guarded(rows, "augment", lambda: augment_row(args, device, best or None))
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "shape": args.shape, "batch": args.batch,
        "bf16_peak_tflops": peak / 1e12, "peak_source": peak_source, "date": time.strftime("%Y-%m-%d %H:%M"),
        "dtypes": list(DTYPES),
    }  # fmt: skip
    write_result(args.json, {"meta": meta, "rows": rows}, announce=False)
    print_table(rows, meta)
    print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\n{meta['device']}, torch {meta['torch']}, bf16 peak {meta['bf16_peak_tflops']:.3g} TFLOP/s")
    for r in rows:
        if "error" in r:
            print(f"{r['part']:<12} FAILED {r['error']}")
        elif r["part"] == "step":
            mem = f"{r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else "-"
            name = f"{r['precision']} {'compiled' if r['compile'] else 'eager'}"
            print(f"step {name:<15} {r['images_per_s']:8.1f} img/s  MFU {r['mfu']:6.1%}  peak {mem}")
        else:
            print(f"{r['part']:<12} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in r.items() if k != "part"))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
