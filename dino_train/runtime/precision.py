"""Mixed precision: choose bf16 / fp16 / fp32 for the hardware, and the matching autocast and scaler."""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch

from dino_train.runtime.errors import ConfigError

# On the CPU, `auto` takes bf16 only when it multiplies matrices at least this much faster than fp32. CPUs
# that list bf16 instructions differ: on one machine of ours bf16 ran 2.4x fp32, on another, listing AVX-512
# BF16 but no AMX, 0.5x. The flags cannot decide it; a 0.3 s measurement can.
BF16_MIN_SPEEDUP = 1.2

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 4096, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an n x n matmul in ``dtype`` (the best of short repeats, so a busy moment on a
    shared machine does not decide it)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm up kernels and caches
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_timing = 4 if device.type == "cuda" else 1  # a GPU matmul is too short to time alone
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(per_timing):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / per_timing)
    return 2 * n**3 / best


def cpu_lists_bf16() -> bool:
    """True when the CPU advertises bf16 matrix instructions (AVX-512 BF16 or AMX); without them bf16 is
    emulated and never worth trying."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=1)
def cpu_matmul_gflops() -> dict[str, float]:
    """fp32 and bf16 matmul GFLOP/s on this CPU at the current thread count (about 0.3 s, once a process)."""
    cpu = torch.device("cpu")
    return {name: matmul_flops(DTYPES[name], cpu, n=1024, seconds=0.15) / 1e9 for name in ("fp32", "bf16")}


def pick_cpu_precision(gflops: dict[str, float]) -> str:
    """bf16 when it is clearly faster than fp32 (by BF16_MIN_SPEEDUP), else fp32, which is also exact."""
    return "bf16" if gflops["bf16"] >= BF16_MIN_SPEEDUP * gflops["fp32"] else "fp32"


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The precision a run uses, and why when ``auto`` chose it: bf16 on CUDA where supported, else fp16;
    on the CPU whichever of bf16 and fp32 multiplies matrices faster here."""
    if requested == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return "bf16", "auto: this GPU supports bf16"
            return "fp16", "auto: this GPU has no bf16, fp16 with a gradient scaler"
        if not cpu_lists_bf16():
            return "fp32", "auto: this CPU has no bf16 instructions"
        gflops = cpu_matmul_gflops()
        chosen = pick_cpu_precision(gflops)
        return chosen, (
            f"auto: matmul here runs bf16 {gflops['bf16']:.0f} vs fp32 {gflops['fp32']:.0f} GFLOP/s"
            f" (bf16 needs {BF16_MIN_SPEEDUP:g}x to be chosen)"
        )
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError(
            "train.precision: fp16 needs a CUDA device (fp16 matmuls on CPU are ~100x slower than bf16); "
            "use train.precision=bf16 or auto"
        )
    return requested, ""


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler only for fp16, whose narrow exponent range needs it."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
