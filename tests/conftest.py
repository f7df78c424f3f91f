import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Two cores: keep each test process on few threads so parallel ranks do not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small embedded data set (10 classes, 32 px) shared by the end-to-end tests."""
    from dino_train.data import generate_embedded_dataset

    return generate_embedded_dataset(
        tmp_path_factory.mktemp("data") / "embedded", image_size=32, train_per_class=4, val_per_class=2
    )


def tiny_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """A ViT-Tiny/8 on 32 px crops with a small head: a step takes a fraction of a second."""
    return [
        f"data.path={data / 'train'}",
        f"train.output_dir={out}",
        "model.arch=vit_tiny",
        "model.patch_size=8",
        "model.out_dim=64",
        "model.head_hidden_dim=32",
        "model.head_bottleneck_dim=16",
        "data.batch_size_per_gpu=8",
        "data.num_workers=0",
        "data.global_crops_size=32",
        "data.local_crops_size=16",
        "data.local_crops_number=2",
        "optim.warmup_epochs=1",
        "train.epochs=2",
        "train.precision=fp32",
        "train.progress_bar=false",
        "train.log_every_steps=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    """A random ViT-Tiny/8 (32 px grid) saved as a backbone-only file, as ``teacher_backbone.pth`` is."""
    import torch

    from dino_train.models import build_backbone
    from dino_train.train.checkpoint import export_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "teacher_backbone.pth"
    export_backbone(build_backbone("vit_tiny", patch_size=8, img_size=32), path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and when other processes hold the two cores,
    OpenMP's spin-waiting makes two-thread ops 30x slower (measured): such tests run on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def python() -> str:
    return sys.executable
