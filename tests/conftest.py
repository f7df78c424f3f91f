"""Fixtures the test files share. Plain helpers (paths, environments, torchrun, overrides) are in
tests/helpers.py."""

import os
from pathlib import Path

import pytest

# One torch thread in the test process (and in what it starts without tests.helpers.ENV), unless the
# environment says otherwise. The models are tiny, and on two cores shared with the processes a test starts
# (or anything else), OpenMP's spin-waiting makes two-thread ops several times slower: the release
# interpolation tests took 2.9 s on one thread and 16.7 s on two on a loaded 2-core machine. A test that
# wants more says so (the demo's run: train.num_threads=2).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest modules first (measured 2026-12-07, alone on 2 cores: the demo's run 280 s, then 30-80 s
# each). `make test` runs two xdist workers, one module at a time each (--dist loadscope): started first,
# the demo's run overlaps everything else instead of ending the suite alone. Order within a module is kept.
_LONGEST_FIRST = (
    "test_demo_learns", "test_multinode", "test_slurm", "test_fsdp", "test_bench", "test_faults"
)  # fmt: skip


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = Path(str(item.fspath)).stem
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their collection order


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small embedded data set (10 classes, 32 px) shared by the end-to-end tests."""
    from dino_train.data import generate_embedded_dataset

    return generate_embedded_dataset(
        tmp_path_factory.mktemp("data") / "embedded",
        image_size=32,
        train_per_class=4,
        val_per_class=2,
        version=1,
    )


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    """Eight photo-like 120 x 90 JPEGs (gradients, shapes, noise): every hue and edge the tensor
    augmentation's ops touch."""
    from bench.data_pipeline import make_jpegs

    return make_jpegs(tmp_path_factory.mktemp("photos"), 8, size=(120, 90))


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


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """One finished tiny training shared by the tests that read a run's files or its end state:
    ``tiny_overrides`` as they are (2 epochs of 5 steps) with an epoch checkpoint after each epoch
    (``train.saveckp_freq=1``), on one thread (exact comparisons with it must run on one thread too).
    Returns (output folder, TrainResult). Read only: copy the folder to resume or change it."""
    import torch

    from dino_train.config import load_config
    from dino_train.train import train
    from tests.helpers import tiny_overrides

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    threads = torch.get_num_threads()
    try:
        result = train(
            load_config(None, tiny_overrides(tiny_data, out, "train.saveckp_freq=1", "train.num_threads=1"))
        )
    finally:
        torch.set_num_threads(threads)
    return out, result
