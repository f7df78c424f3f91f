import hashlib

import pytest
import torch
from PIL import Image

from dino_train.data import (
    EMBEDDED_CLASSES,
    DataError,
    ImageDataset,
    MultiCropAugmentation,
    MultiCropDataset,
    ResumableSampler,
    build_pretrain_loader,
    eval_transform,
    generate_embedded_dataset,
)
from dino_train.data.transforms import RandomGaussianBlur, RandomSolarize


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_embedded_dataset_is_deterministic_and_idempotent(tmp_path):
    a = generate_embedded_dataset(
        tmp_path / "a", image_size=32, train_per_class=3, val_per_class=2, version=1
    )
    b = generate_embedded_dataset(
        tmp_path / "b", image_size=32, train_per_class=3, val_per_class=2, version=1
    )
    assert digest(a) == digest(b)
    train, val = ImageDataset(a / "train"), ImageDataset(a / "val")
    assert train.classes == sorted(EMBEDDED_CLASSES) and len(EMBEDDED_CLASSES) == 10
    assert len(train) == 30 and len(val) == 20
    assert Image.open(train.samples[0][0]).size == (32, 32)
    # Train and val are different draws.
    assert (a / "train" / "star" / "00000.png").read_bytes() != (
        a / "val" / "star" / "00000.png"
    ).read_bytes()
    first = a / "train" / "circle" / "00000.png"
    mtime = first.stat().st_mtime_ns
    generate_embedded_dataset(tmp_path / "a", image_size=32, train_per_class=3, val_per_class=2, version=1)
    assert first.stat().st_mtime_ns == mtime  # nothing rewritten
    c = generate_embedded_dataset(
        tmp_path / "a", image_size=32, train_per_class=3, val_per_class=2, version=1, seed=1
    )
    assert digest(c) != digest(b)  # other parameters regenerate


def test_multicrop_shapes_and_normalisation():
    aug = MultiCropAugmentation(64, (0.4, 1.0), 3, 32, (0.05, 0.4))
    img = Image.new("RGB", (80, 60), (200, 30, 90))
    crops = aug(img)
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    gray = aug(Image.linear_gradient("L").convert("RGB"))
    assert min(c.min().item() for c in gray) < 0 < max(c.max().item() for c in gray)


def test_blur_and_solarise_probabilities():
    torch.manual_seed(0)
    img = Image.linear_gradient("L").convert("RGB")
    n = 400
    solarised = sum(RandomSolarize(0.2)(img) is not img for _ in range(n)) / n
    blurred = sum(RandomGaussianBlur(0.5)(img) is not img for _ in range(n)) / n
    assert abs(solarised - 0.2) < 0.06 and abs(blurred - 0.5) < 0.08
    assert all(RandomGaussianBlur(1.0)(img) is not img for _ in range(20))
    aug = MultiCropAugmentation(32, (0.4, 1.0), 2, 16, (0.05, 0.4))
    # Solarisation sits in global crop 2's pipeline only; global 1 always blurs.
    kinds = lambda pipeline: [type(t).__name__ for t in pipeline.transforms]  # noqa: E731
    assert "RandomSolarize" in kinds(aug.global2)
    assert "RandomSolarize" not in kinds(aug.global1) and "RandomSolarize" not in kinds(aug.local)
    solariser = next(t for t in aug.global2.transforms if isinstance(t, RandomSolarize))
    assert (solariser.p, solariser.threshold) == (0.2, 128)
    blur_p = [
        next(t.p for t in p.transforms if isinstance(t, RandomGaussianBlur))
        for p in (aug.global1, aug.global2, aug.local)
    ]
    assert blur_p == [1.0, 0.1, 0.5]


def test_sampler_partitions_and_resumes():
    s0 = ResumableSampler(20, num_replicas=2, rank=0, seed=3, batch_size=4)
    s1 = ResumableSampler(20, num_replicas=2, rank=1, seed=3, batch_size=4)
    a, b = [i for i, _ in s0], [i for i, _ in s1]
    assert len(a) == len(b) == 8 and not set(a) & set(b)  # 20 -> 16 kept (multiple of 2 x 4)
    assert s0.batches_per_epoch == 2
    s0.set_epoch(1)
    epoch1 = [i for i, _ in s0]
    assert epoch1 != a and all(e == 1 for _, e in s0)
    s0.set_epoch(0)
    assert [i for i, _ in s0] == a  # same seed, same order
    s0.set_start_batch(1)
    assert [i for i, _ in s0] == a[4:] and len(s0) == 4


def test_multicrop_dataset_is_seeded_per_sample_and_leaves_rng_alone(tmp_path):
    root = generate_embedded_dataset(
        tmp_path / "d", image_size=32, train_per_class=2, val_per_class=1, version=1
    )
    ds = MultiCropDataset(
        ImageDataset(root / "train"), MultiCropAugmentation(32, (0.4, 1), 2, 16, (0.05, 0.4)), seed=0
    )
    torch.manual_seed(123)
    state = torch.get_rng_state()
    x1, _, _ = ds[(3, 0)]
    assert torch.equal(torch.get_rng_state(), state)
    x2, _, _ = ds[(3, 0)]
    x3, _, _ = ds[(3, 1)]
    assert all(torch.equal(p, q) for p, q in zip(x1, x2, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(x1, x3, strict=True))


def test_loader_same_batches_whatever_the_workers(tmp_path):
    root = generate_embedded_dataset(
        tmp_path / "d", image_size=32, train_per_class=2, val_per_class=1, version=1
    )
    aug = MultiCropAugmentation(32, (0.4, 1), 2, 16, (0.05, 0.4))
    batches = []
    for workers in (0, 2):
        loader, sampler = build_pretrain_loader(str(root / "train"), aug, 4, workers, 0, 0, 1, False)
        sampler.set_epoch(2)
        batches.append(list(loader))
    assert len(batches[0]) == 5
    for (c0, l0, _), (c1, l1, _) in zip(*batches, strict=True):
        assert torch.equal(l0, l1)
        assert all(torch.equal(a, b) for a, b in zip(c0, c1, strict=True))


def test_flat_folder_is_unlabelled_and_errors_name_the_path(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("L", (10, 10), i * 50).save(flat / f"{i}.jpg")
    ds = ImageDataset(flat, transform=eval_transform(16, 16))
    assert ds.classes == [] and [lbl for _, lbl in ds.samples] == [-1, -1, -1]
    x, label = ds[0]
    assert x.shape == (3, 16, 16) and label == -1  # grayscale converted to RGB
    with pytest.raises(DataError, match="does not exist"):
        ImageDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="is a file"):
        ImageDataset(flat / "0.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        ImageDataset(tmp_path / "empty")
    (tmp_path / "classes" / "a").mkdir(parents=True)
    (tmp_path / "classes" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "classes" / "a" / "x.png")
    with pytest.warns(UserWarning, match="has no images"):
        assert ImageDataset(tmp_path / "classes").classes == ["a"]
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_pretrain_loader(str(flat), lambda im: [im], 4, 0, 0, 0, 1, False)
