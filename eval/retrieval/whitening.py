"""PCA whitening learned on a separate set of images, the release's copy detection option.

The release subtracts the whitening set's mean feature, rotates onto the eigenvectors of the matrix
``X^T X / N`` of the whitening features X and divides each coordinate by its eigenvalue to the power 0.5
(eigenvalues below 1e-5 of the largest are raised to it, so directions the set does not span are not
blown up without bound); descriptors are L2-normalised afterwards. Note that the release builds that
matrix from the *uncentred* features (a second moment, not the covariance); ``centred=True`` uses the
covariance instead. Pure: tensors in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

WHITENING_POWER = 0.5  # the release's PCA(whit=0.5): divide by the standard deviation
EIGEN_FLOOR = 1e-5  # relative to the largest eigenvalue, as the release


@dataclass(frozen=True)
class Whitening:
    """x -> (x - mean) @ projection.T: (N, D) -> (N, dim)."""

    mean: Tensor  # (D,)
    projection: Tensor  # (dim, D), rows ordered by decreasing eigenvalue
    energy_kept: float  # fraction of the eigenvalue sum in the kept directions

    def apply(self, x: Tensor) -> Tensor:
        return ((x.double() - self.mean) @ self.projection.T).float()


def learn_whitening(
    feats: Tensor, dim: int | None = None, power: float = WHITENING_POWER, centred: bool = False
) -> Whitening:
    """The whitening of ``feats`` (N, D); ``dim`` keeps the leading directions (None: all D)."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"whitening needs (N, D) features of at least 2 images; got {tuple(feats.shape)}")
    x = feats.double()
    mean = x.mean(dim=0)
    centre = x - mean if centred else x
    eigvals, eigvecs = torch.linalg.eigh(centre.T @ centre / x.shape[0])
    eigvals = eigvals.clamp(min=float(eigvals.max()) * EIGEN_FLOOR)
    order = torch.argsort(eigvals, descending=True)[: dim or x.shape[1]]
    kept, vecs = eigvals[order], eigvecs[:, order]
    projection = torch.diag(kept.pow(-power)) @ vecs.T
    return Whitening(mean, projection, float(kept.sum() / eigvals.sum()))
