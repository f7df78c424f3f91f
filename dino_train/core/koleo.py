"""The KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search").

dinov2 adds it on the student's CLS features of each global crop: the Kozachenko-Leonenko estimate of
the differential entropy of the features on the sphere, up to constants, is the mean log distance of
each point to its nearest neighbour; maximising it (minimising its negative) spreads the batch evenly.
It is computed per rank, on that rank's batch only, as dinov2 does (no gathering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean_i log(||x_i - x_nn(i)|| + eps) over the L2-normalised rows of ``features`` (N, D), N >= 2.

    x_nn(i) is the row nearest to x_i other than itself (largest cosine similarity). Distances are on the
    unit sphere, in [0, 2]; ``eps`` keeps the loss finite (-log eps, about 18.4) for coincident rows.
    Computed in float32; the gradient flows through both x_i and its neighbour (the choice of neighbour
    is an argmax and carries none). Returns a scalar.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (N, D) features with N >= 2, got shape {tuple(features.shape)}")
    x = F.normalize(features.float(), dim=-1)
    with torch.no_grad():
        sim = x @ x.T
        # A row is its own nearest neighbour at similarity 1; -2 is below any cosine similarity.
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    distances = torch.linalg.vector_norm(x - x[nearest], dim=-1)
    return -torch.log(distances + eps).mean()


def koleo_per_crop(student_cls: torch.Tensor, n_global: int = 2, eps: float = 1e-8) -> torch.Tensor:
    """Mean of ``koleo_loss`` over the global crops: student_cls (n_global * B, D), crops stacked as
    [g1 batch, g2 batch, ...]. Each crop's batch is regularised on its own, as two views of the same
    image are near each other by design and would otherwise be each other's neighbours. Scalar."""
    if n_global < 1 or student_cls.shape[0] % n_global:
        raise ValueError(
            f"student_cls has {student_cls.shape[0]} rows, not a multiple of n_global={n_global}"
        )
    return torch.stack([koleo_loss(chunk, eps) for chunk in student_cls.chunk(n_global)]).mean()
