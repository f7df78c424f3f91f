"""The DINO projection head: MLP, L2 normalisation, weight-normalised prototypes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are ``weight_g * weight_v / ||weight_v||``.

    Written out (rather than ``nn.utils.weight_norm``) so the parameters keep the release's names
    ``weight_g`` (K, 1) and ``weight_v`` (K, in) in every torch version.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        v = torch.empty(out_features, in_features)
        # Same init as the release: nn.Linear's default for v, then g = 1 (unit-norm prototypes).
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        # g before v, the order torch's weight_norm registers them in (so the release's optimizer states
        # line up with ours parameter for parameter).
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """(B, in_dim) -> (B, out_dim) logits.

    ``mlp``: nlayers Linear layers (GELU between, optional BatchNorm), the last to ``bottleneck_dim``;
    then L2 normalisation and the prototype layer. With ``norm_last_layer`` the prototypes' norms are
    frozen at 1, so the logits are cosine similarities.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for a, b in zip(dims[:-1], dims[1:], strict=True):
                layers.append(nn.Linear(a, b))
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> the L2-normalised bottleneck (B, bottleneck_dim) the prototypes score."""
        x = self.mlp(x)
        # Normalise in fp32: under reduced precision the norm of a 256-d vector can lose its eps.
        return F.normalize(x.float(), dim=-1, p=2).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(x))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def head_from_state_dict(sd: dict[str, torch.Tensor]) -> DINOHead:
    """A DINOHead shaped like the weights ``sd`` (``mlp.*`` and ``last_layer.weight_g/_v``, the release's
    names and ours), with them loaded: its layers, widths and BatchNorm are read from the shapes, so a
    head can be taken from any checkpoint without the config that made it. A ValueError says what is
    missing."""
    if "last_layer.weight_v" not in sd or "last_layer.weight_g" not in sd:
        raise ValueError("no prototype layer (last_layer.weight_g / last_layer.weight_v)")
    out_dim, bottleneck = sd["last_layer.weight_v"].shape
    if "mlp.weight" in sd:  # one layer: the mlp is a single Linear
        in_dim, nlayers, hidden, use_bn = sd["mlp.weight"].shape[1], 1, 0, False
    else:
        linears = sorted(
            int(k.split(".")[1]) for k, v in sd.items() if k.startswith("mlp.") and k.endswith(".weight")
            and v.dim() == 2
        )  # fmt: skip
        if not linears:
            raise ValueError("no mlp layers (mlp.<i>.weight)")
        first = sd[f"mlp.{linears[0]}.weight"]
        in_dim, hidden, nlayers = first.shape[1], first.shape[0], len(linears)
        use_bn = any(k.startswith("mlp.") and k.endswith(".running_mean") for k in sd)
    head = DINOHead(int(in_dim), int(out_dim), use_bn, True, nlayers, int(hidden or 1), int(bottleneck))
    head.load_state_dict(sd)
    return head
