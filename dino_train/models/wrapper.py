"""Multi-crop forward: one backbone pass per crop resolution, then the head once over all crops."""

from __future__ import annotations

import torch
from torch import nn

from dino_train.models.backbone import build_backbone, embed_dim
from dino_train.models.head import DINOHead


class MultiCropWrapper(nn.Module):
    """Holds ``backbone`` and ``head``: weights are named ``backbone.*`` and ``head.*`` as in the release."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, crops: list[torch.Tensor] | torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """crops: list of (B, 3, H_i, W_i); consecutive crops of one size share a backbone pass.

        Returns (sum of batch sizes, out_dim) head outputs in crop order, and with ``return_features``
        also the backbone's CLS features (sum of batch sizes, embed_dim).
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        features = torch.cat(feats)
        out = self.head(features)
        return (out, features) if return_features else out


def build_student_teacher(
    arch: str,
    patch_size: int,
    img_size: int,
    drop_path_rate: float,
    out_dim: int,
    use_bn_in_head: bool = False,
    norm_last_layer: bool = True,
    head_nlayers: int = 3,
    head_hidden_dim: int = 2048,
    head_bottleneck_dim: int = 256,
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop path) and teacher (without), the teacher initialised equal and frozen."""

    def make(dpr: float) -> MultiCropWrapper:
        backbone = build_backbone(arch, patch_size, img_size, dpr)
        head = DINOHead(
            embed_dim(backbone),
            out_dim,
            use_bn=use_bn_in_head,
            norm_last_layer=norm_last_layer,
            nlayers=head_nlayers,
            hidden_dim=head_hidden_dim,
            bottleneck_dim=head_bottleneck_dim,
        )
        return MultiCropWrapper(backbone, head)

    student = make(drop_path_rate)
    teacher = make(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher
