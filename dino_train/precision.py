"""Mixed precision: choose bf16 / fp16 / fp32 for the hardware, and the matching autocast and scaler."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dino_train.config import ConfigError


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX); elsewhere bf16 is
    emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware runs it natively, else fp16 on CUDA, else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError(
            "train.precision: fp16 needs a CUDA device (fp16 matmuls on CPU are ~100x slower than bf16); "
            "use train.precision=bf16 or auto"
        )
    return requested


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler only for fp16, whose narrow exponent range needs it."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
