"""Peak memory of a block of work: CUDA allocator peak on GPUs, resident-set high-water mark on CPU.

On the CPU the resident set only follows the tensors' memory when freed buffers go back to the system.
glibc keeps freed heap memory and moves its mmap threshold up as large buffers come and go, so
:func:`exact_cpu_accounting` fixes the threshold at 128 KiB (every tensor buffer of any size becomes its
own mapping, unmapped when freed) and trims the heap: after that the high-water mark over a block minus the
resident set before it is what the block allocated at its peak.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def exact_cpu_accounting() -> bool:
    """Make the resident set track live buffers from now on (glibc only); False where that is not possible."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024) == 1
        gc.collect()
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the VmHWM high-water mark of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    """Current resident set size of this process (CPU)."""
    return _status_mib("VmRSS")


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM")


def measure_step_memory(step: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(peak memory ``step`` adds above what is held before it, the process's peak), MiB.

    On CPU this switches the process to exact accounting for good (it slows later allocations): call it
    after the timed work.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        exact_cpu_accounting()
        base = rss_mib()
    reset_peak(device)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = peak_mib(device)
    return peak - base, peak
