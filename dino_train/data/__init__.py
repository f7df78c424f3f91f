"""Data: the embedded default data set, multi-crop augmentation, datasets, sampling and loading."""

from dino_train.data.datasets import IMAGE_EXTENSIONS, DataError, ImageDataset
from dino_train.data.embedded import EMBEDDED_CLASSES, generate_embedded_dataset
from dino_train.data.loader import build_pretrain_loader, collate_crops
from dino_train.data.sampler import MultiCropDataset, ResumableSampler, mix_seed
from dino_train.data.transforms import MultiCropAugmentation, eval_transform

__all__ = [
    "EMBEDDED_CLASSES",
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageDataset",
    "MultiCropAugmentation",
    "MultiCropDataset",
    "ResumableSampler",
    "build_pretrain_loader",
    "collate_crops",
    "eval_transform",
    "generate_embedded_dataset",
    "mix_seed",
]
