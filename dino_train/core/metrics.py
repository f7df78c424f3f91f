"""Collapse telemetry of DINO's outputs: pure tensor functions, computed on logging steps.

DINO's usual failure on new data is collapse: the teacher spreads its output uniformly over the prototypes
(the loss sits at ln K) or puts every image on the same prototype. Both show in the teacher's output long
before a k-NN score would; ``dino_train.monitor.health`` turns these numbers into warnings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def dino_metrics(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
) -> dict[str, torch.Tensor]:
    """Collapse telemetry from one step's outputs; all scalars, left on the device.

    student_out: (n_crops * B, K), teacher_out: (2 * B, K), center: (1, K) as used by this step's loss.
    - teacher_entropy: mean entropy of the teacher's distributions; near ln K means uniform collapse.
    - teacher_entropy_ratio: the same over ln K, in [0, 1].
    - batch_entropy_ratio: entropy of the batch-mean teacher distribution over ln K; near 0 means every
      image goes to the same prototypes (one-prototype collapse).
    - teacher_information: batch-mean entropy minus mean entropy, in nats: the mutual information between
      the image and the teacher's prototype within the batch. Near 0 in both kinds of collapse (every image
      gets the same distribution), positive while the teacher still tells images apart, even when each
      distribution is almost flat.
    - prototypes_in_use: distinct argmax prototypes of the teacher over the batch.
    - kl_teacher_student: KL(teacher || student) over the two global-global crop pairs.
    - center_norm: L2 norm of the center.
    """
    k = teacher_out.shape[-1]
    b = teacher_out.shape[0] // 2
    log_q = F.log_softmax((teacher_out.float() - center) / teacher_temp, dim=-1)
    q = log_q.exp()
    entropy = -(q * log_q).sum(-1).mean()
    mean_q = q.mean(0)
    batch_entropy = -(mean_q * mean_q.clamp_min(1e-30).log()).sum()
    in_use = torch.zeros(k, dtype=torch.bool, device=q.device)
    in_use[q.argmax(-1)] = True
    log_p = F.log_softmax(student_out[: 2 * b].float() / student_temp, dim=-1)
    # Teacher view 1 is matched with student view 2 and the other way round, as in the loss.
    log_p_swapped = torch.cat([log_p[b:], log_p[:b]])
    kl = (q * (log_q - log_p_swapped)).sum(-1).mean()
    return {
        "teacher_entropy": entropy,
        "teacher_entropy_ratio": entropy / math.log(k),
        "batch_entropy_ratio": batch_entropy / math.log(k),
        "teacher_information": batch_entropy - entropy,
        "prototypes_in_use": in_use.sum().float(),
        "kl_teacher_student": kl,
        "center_norm": center.float().norm(),
    }


@torch.no_grad()
def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std across the batch of L2-normalised features (N, D).

    Normalising first makes it scale-free: 0 when every image maps to the same direction, about
    1/sqrt(D) for features spread evenly over the sphere.
    """
    return F.normalize(features.float(), dim=-1).std(dim=0).mean()
