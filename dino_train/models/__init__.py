"""Backbones (the release's ViTs and any timm model), the DINO head and the multi-crop wrapper."""

from dino_train.models.backbone import (
    ARCH_DIMS,
    RELEASE_ARCHS,
    BackboneSpec,
    NotAViTError,
    as_vit,
    backbone_spec,
    build_backbone,
    build_from_spec,
)
from dino_train.models.head import DINOHead, WeightNormLinear
from dino_train.models.wrapper import MultiCropWrapper, build_student_teacher, model_spec

__all__ = [
    "ARCH_DIMS",
    "RELEASE_ARCHS",
    "BackboneSpec",
    "DINOHead",
    "MultiCropWrapper",
    "NotAViTError",
    "WeightNormLinear",
    "as_vit",
    "backbone_spec",
    "build_backbone",
    "build_from_spec",
    "build_student_teacher",
    "model_spec",
]
