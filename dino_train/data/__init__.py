"""Data: the embedded default data set, multi-crop augmentation (the release's PIL path and the batched
tensor path), datasets, sampling and loading."""

from dino_train.data.datasets import IMAGE_EXTENSIONS, DataError, ImageDataset
from dino_train.data.embedded import EMBEDDED_CLASSES, generate_embedded_dataset
from dino_train.data.loader import (
    AUGMENT_DEVICES,
    build_pretrain_loader,
    build_tensor_pretrain_loader,
    collate_crops,
    resolve_augment_device,
)
from dino_train.data.photometric import RawCrops, crops_to_device, finish_crops
from dino_train.data.sampler import MultiCropDataset, ResumableSampler, mix_seed
from dino_train.data.tensor_augment import TensorMultiCrop
from dino_train.data.transforms import MultiCropAugmentation, eval_transform

__all__ = [
    "AUGMENT_DEVICES",
    "EMBEDDED_CLASSES",
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageDataset",
    "MultiCropAugmentation",
    "MultiCropDataset",
    "RawCrops",
    "ResumableSampler",
    "TensorMultiCrop",
    "build_pretrain_loader",
    "build_tensor_pretrain_loader",
    "collate_crops",
    "crops_to_device",
    "eval_transform",
    "finish_crops",
    "generate_embedded_dataset",
    "mix_seed",
    "resolve_augment_device",
]
