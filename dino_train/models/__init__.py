"""Backbone (timm ViT), DINO head and the multi-crop wrapper."""

from dino_train.models.backbone import ARCH_DIMS, build_backbone
from dino_train.models.head import DINOHead, WeightNormLinear
from dino_train.models.wrapper import MultiCropWrapper, build_student_teacher

__all__ = [
    "ARCH_DIMS",
    "DINOHead",
    "MultiCropWrapper",
    "WeightNormLinear",
    "build_backbone",
    "build_student_teacher",
]
