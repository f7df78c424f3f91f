"""Parameter groups, optimizers, per-step values, gradient clipping and the last-layer freeze."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dino_train.train.sharding import grad_norms, local_shards


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups as in the release: [decayed, not decayed]; biases and 1-D parameters are not decayed.

    Only group 0 follows the weight-decay schedule; group 1 keeps weight_decay 0.
    """
    decayed, not_decayed = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_decayed if name.endswith(".bias") or p.ndim == 1 else decayed).append(p)
    return [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by the release for large-batch SGD: trust ratio and weight decay
    on parameters with more than one dimension only."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    ratio = torch.where(
                        (p_norm > 0) & (u_norm > 0), g["eta"] * p_norm / u_norm, torch.ones_like(p_norm)
                    )
                    dp = dp.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW with fused kernels where torch has them for the parameters' device (CUDA, CPU, ...), else
    foreach. Fused updates each tensor in one pass: 3.5x less time than foreach on the CPU for ViT-S/16
    with 65536 prototypes (29 against 103 ms of CPU time per step, one thread, 44M parameters), equal
    within float rounding (1.5e-8 after 3 steps). A resumed checkpoint's groups keep the kernel its run
    started with (torch restores ``fused`` / ``foreach`` from it), so resuming stays bit-identical."""
    try:
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, foreach=True)


def build_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    """lr and weight decay start at 0 and are set every step from the schedules."""
    groups = param_groups(model)
    if name == "adamw":
        return adamw(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=0.0, foreach=True)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"optim.optimizer: unknown optimizer {name!r}")


def apply_step_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the decayed group follows the schedule
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients(params: Iterable[torch.nn.Parameter], clip: float) -> torch.Tensor | None:
    """Per-parameter clipping as in the release: each gradient with norm above ``clip`` is scaled to it.

    Done with foreach ops and tensor coefficients, so no host sync per parameter. Returns the
    pre-clip norms (P,) for logging, or None when there are no gradients.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = grad_norms(grads)  # whole-tensor norms, of FSDP's sharded gradients too
    if clip > 0:
        coefs = torch.clamp(clip / (norms + 1e-6), max=1.0)
        torch._foreach_mul_(local_shards(grads), list(coefs.unbind()))
    return norms


def cancel_frozen_grads(
    model: nn.Module, epoch: int, freeze_last_layer: int, freeze_backbone: int = 0
) -> None:
    """During the first ``freeze_last_layer`` epochs the prototypes, and during the first
    ``freeze_backbone`` epochs the backbone, get no update at all (grad None makes AdamW skip them: no
    decay, no moment update). The EMA teacher's copy then stays where it is too."""
    last, backbone = epoch < freeze_last_layer, epoch < freeze_backbone
    if not (last or backbone):
        return
    for name, p in model.named_parameters():
        if (last and "last_layer" in name) or (backbone and name.startswith("backbone.")):
            p.grad = None
