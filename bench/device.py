"""The device and thread count a benchmark runs with, read the same way by every benchmark."""

from __future__ import annotations

import torch


def pick_device(requested: str, threads: int = 0) -> torch.device:
    """``requested`` is auto, cpu or cuda (auto: CUDA when torch sees it); ``threads`` > 0 sets torch's
    intra-op threads, 0 keeps its default."""
    if threads:
        torch.set_num_threads(threads)
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")
