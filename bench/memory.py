"""Peak memory of a block of work: CUDA allocator peak on GPUs, resident-set high-water mark on CPU."""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the VmHWM high-water mark of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mib() -> float:
    """Current resident set size of this process (CPU), or allocated memory on CUDA."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
