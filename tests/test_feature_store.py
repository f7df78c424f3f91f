"""Patch tokens to disk: ``eval_knn --dump-features DIR --patch-tokens`` and
``dino.extract_features(..., patch_tokens=True, out=DIR)`` stream them into a feature store
(``dino_train.measure.feature_store``) that holds the model's own tokens, in data set order, with the grid
recorded."""

import pytest
import torch

import dino
from dino_train.data import ImageDataset, eval_transform
from dino_train.measure.feature_store import open_store
from dino_train.models.loading import load_backbone
from dino_train.runtime.files import CheckpointError
from eval.knn.cli import FEATURES_FILE, PATCH_DIR
from eval.knn.cli import main as knn_main


def test_knn_dump_holds_each_images_patch_tokens(backbone_file, tiny_data, tmp_path, one_thread):
    out = tmp_path / "dump"
    argv = ["--checkpoint", str(backbone_file), "--data", str(tiny_data), "--ks", "1", "--resize", "32",
            "--crop", "32", "--num-workers", "0", "--batch-size", "7", "--no-progress",
            "--dump-features", str(out), "--patch-tokens"]  # fmt: skip
    assert knn_main(argv) == 0
    model, _ = load_backbone(backbone_file)
    bank = torch.load(out / FEATURES_FILE, weights_only=True)
    for split in ("train", "val"):
        store = open_store(out / PATCH_DIR / split)
        data = ImageDataset(tiny_data / split, eval_transform(resize=32, crop=32))
        # ViT-Tiny/8 on 32 px crops: a 4 x 4 grid of 192-wide tokens per image, in float16.
        assert store.patch_tokens.shape == (len(data), 16, 192) and store.patch_tokens.dtype == torch.float16
        assert store.grid == (4, 4) and store.patch_size == 8 and store.classes == data.classes
        assert store.paths == [p for p, _ in data.samples]
        with torch.no_grad():
            tokens = model.forward_features(torch.stack([data[i][0] for i in range(len(data))]))
        torch.testing.assert_close(store.patch_tokens.float(), tokens[:, 1:], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(store.features, bank[f"{split}_feats"])  # the CLS features k-NN scored
        assert torch.equal(store.labels, torch.tensor([y for _, y in data.samples]))
        assert store.patch_grid(3).shape == (4, 4, 192)


def test_streamed_store_equals_the_in_memory_result(backbone_file, tiny_data, tmp_path, one_thread):
    model, _ = load_backbone(backbone_file)
    kwargs = {"patch_tokens": True, "image_size": 32, "resize": 32, "batch_size": 3, "progress": False}
    in_memory = dino.extract_features(model, tiny_data / "val", **kwargs)
    streamed = dino.extract_features(model, tiny_data / "val", out=tmp_path / "store", **kwargs)
    assert torch.equal(streamed.features, in_memory.features)
    assert torch.equal(streamed.patch_tokens, in_memory.patch_tokens.half())
    assert torch.equal(streamed.labels, in_memory.labels) and streamed.paths == in_memory.paths
    again = dino.load_features(tmp_path / "store")
    assert torch.equal(again.patch_tokens, streamed.patch_tokens) and again.classes == in_memory.classes
    with pytest.raises(ValueError, match="pass patch_tokens=True"):
        dino.extract_features(model, tiny_data / "val", out=tmp_path / "x", image_size=32)
    (tmp_path / "store" / "store.json").unlink()  # as an extraction that was interrupted leaves it
    with pytest.raises(CheckpointError, match="did not finish"):
        open_store(tmp_path / "store")


def test_patch_tokens_need_a_dump_folder_and_a_vit(backbone_file, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        knn_main(["--checkpoint", str(backbone_file), "--data", str(tiny_data), "--patch-tokens"])
    assert (
        err.value.code == 2
        and "--patch-tokens writes into the --dump-features DIR" in capsys.readouterr().err
    )


def test_a_damaged_store_is_named(backbone_file, tiny_data, tmp_path, one_thread):
    model, _ = load_backbone(backbone_file)
    kwargs = {"patch_tokens": True, "image_size": 32, "resize": 32, "progress": False}
    folder = tmp_path / "store"
    dino.extract_features(model, tiny_data / "val", out=folder, **kwargs)
    tokens = folder / "patch_tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(CheckpointError, match=f"{tokens} cannot be read as the store's array.*re-extract"):
        open_store(folder)
    meta = folder / "store.json"
    meta.write_text('{"format": "dino-feature-store", "version": 1}')
    with pytest.raises(CheckpointError, match="store.json lacks num_images, grid, dim, patch_size, classes"):
        open_store(folder)


def test_a_dump_killed_mid_extraction_is_never_read_as_whole(backbone_file, tiny_data, tmp_path, one_thread):
    """kill -9 while the patch tokens stream to disk: the store says it did not finish, --load-features
    finds nothing to score, and the same command run again writes what an uninterrupted run writes."""
    import subprocess
    import sys
    import time

    from tests.helpers import ENV, kill_tree

    def argv(out):
        return ["--checkpoint", str(backbone_file), "--data", str(tiny_data), "--ks", "1", "--resize", "32",
                "--crop", "32", "--num-workers", "0", "--batch-size", "1", "--no-progress",
                "--dump-features", str(out), "--patch-tokens"]  # fmt: skip

    assert knn_main(argv(tmp_path / "whole")) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "eval.knn", *argv(cut)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    tokens = cut / PATCH_DIR / "train" / "patch_tokens.npy"
    deadline = time.monotonic() + 120
    while not tokens.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_tree(proc)  # the store is being written: its file exists, store.json does not yet
    proc.wait(timeout=30)
    assert proc.returncode not in (0, None), "the extraction finished before it could be killed"
    with pytest.raises(CheckpointError, match="did not finish"):
        open_store(cut / PATCH_DIR / "train")
    with pytest.raises(SystemExit) as err:
        knn_main(["--load-features", str(cut), "--ks", "1"])
    assert err.value.code != 0 and not (cut / FEATURES_FILE).exists()

    assert knn_main(argv(cut)) == 0  # the same command again
    for split in ("train", "val"):
        a, b = open_store(tmp_path / "whole" / PATCH_DIR / split), open_store(cut / PATCH_DIR / split)
        assert torch.equal(a.patch_tokens, b.patch_tokens) and torch.equal(a.features, b.features)
    whole = torch.load(tmp_path / "whole" / FEATURES_FILE, weights_only=True)
    again = torch.load(cut / FEATURES_FILE, weights_only=True)
    assert torch.equal(whole["train_feats"], again["train_feats"])
