"""The one device picker: training, evaluation, the notebook API and the benchmarks all choose here."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """A device was asked for that this machine does not have."""


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (``local_rank`` modulo the GPUs) when torch sees CUDA, else the CPU;
    ``cuda``: the same, an error without CUDA; ``cpu``: the CPU. A chosen GPU becomes the current one."""
    if requested not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device {requested!r} is not one of auto, cpu, cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda was asked for but torch sees no CUDA device; use cpu (or auto)")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
