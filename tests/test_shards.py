"""Sharded streaming data (data.format=shards): dino-make-shards, the split of the shards over ranks and
workers, the shuffle buffer, bad samples, and resuming to the same position."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
import webdataset as wds

from dino_train.config import load_config
from dino_train.data import DataError
from dino_train.data.make_shards import main as make_shards
from dino_train.data.shard_index import load_shard_index, pass_shards
from dino_train.data.shards import ShardStream, build_shard_loader
from dino_train.train import train
from tests.helpers import tiny_overrides

CROPS = (32, (0.4, 1.0), 2, 16, (0.05, 0.4))  # MultiCropAugmentation's arguments, as in tiny_overrides


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> Path:
    """tiny_data's 40 training images in shards of 7 (6 shards, the last of 5)."""
    dst = tmp_path_factory.mktemp("shards") / "train"
    assert make_shards([str(tiny_data / "train"), str(dst), "--shard-size", "7"]) == 0
    return dst


def tar_members(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                out[f"{shard.name}/{m.name}"] = tar.extractfile(m).read()
    return out


def test_make_shards_packs_every_readable_file_and_counts_the_bad(tiny_data, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_data / "train", src)
    classes = sorted(p.name for p in src.iterdir())
    (src / classes[3] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    dst = tmp_path / "shards"
    assert make_shards([str(src), str(dst), "--shard-size", "16", "--workers", "2"]) == 0
    assert "wrote 40 images in 3 shard(s)" in capsys.readouterr().out
    index = json.loads((dst / "shards.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [16, 16, 8] and index["skipped"] == 1
    assert index["classes"] == classes
    assert "broken.png" in (dst / "skipped.txt").read_text()
    members = tar_members(dst)
    # Every readable file, unchanged, with its class index beside it.
    originals = {sha(p.read_bytes()): classes.index(p.parent.name) for p in src.rglob("*.png")}
    originals.pop(sha((src / classes[3] / "broken.png").read_bytes()))
    packed = {
        sha(v): int(members[k[: -len("png")] + "cls"]) for k, v in members.items() if k.endswith(".png")
    }
    assert packed == originals
    # Shuffled before packing: the first shard mixes classes.
    first = [int(v) for k, v in members.items() if k.startswith("shard-000000") and k.endswith(".cls")]
    assert len(set(first)) > 3


@pytest.mark.parametrize(
    "args, words",
    [
        (["{tmp}/nope", "{tmp}/out"], "data path {tmp}/nope does not exist"),
        (["{data}", "{tmp}/out", "--shard-size", "0"], "--shard-size 0: must be at least 1"),
        (["{data}", "{shards}"], "already holds shards"),
    ],
)
def test_make_shards_bad_input_is_one_line_and_exit_2(tiny_data, shards, tmp_path, capsys, args, words):
    fill = {"tmp": str(tmp_path), "data": str(tiny_data / "train"), "shards": str(shards)}
    assert make_shards([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words.format(**fill) in err


def test_index_from_folder_pattern_or_headers(shards, tmp_path):
    by_folder = load_shard_index(str(shards))
    assert by_folder.samples == 40 and len(by_folder.paths) == 6 and len(by_folder.classes) == 10
    by_pattern = load_shard_index(str(shards / "shard-{000001..000005}.tar"))
    assert by_pattern.counts == (7, 7, 7, 7, 5)
    bare = tmp_path / "bare"  # no shards.json: counted from the tar headers
    shutil.copytree(shards, bare)
    (bare / "shards.json").unlink()
    assert load_shard_index(str(bare)).counts == by_folder.counts
    with pytest.raises(DataError, match="names no .tar shards"):
        load_shard_index(str(tmp_path))
    with pytest.raises(DataError, match="shard-000006.tar does not exist \\(4 missing\\)"):
        load_shard_index(str(shards / "shard-{000004..000009}.tar"))


def stream(shards: Path, world: int, rank: int, workers: int, buffer: int = 10) -> ShardStream:
    loader, s = build_shard_loader(str(shards), "pil", CROPS, 2, workers, 0, rank, world, False, buffer)
    return s


def test_one_pass_of_all_streams_reads_every_sample_once(shards):
    index = load_shard_index(str(shards))
    keys = {}
    for rank in range(2):
        s = stream(shards, world=2, rank=rank, workers=2)
        for w in range(2):
            q = rank * 2 + w
            length = sum(index.counts[i] for i in pass_shards(6, 0, 0, q, 4))
            keys[q] = [x["__key__"] for x in islice(s._raw_from(q, 0), length)]
    everything = [k for ks in keys.values() for k in ks]
    assert sorted(everything) == [f"{n:09d}" for n in range(40)]  # each sample once, none lost
    # The buffer shuffles within a stream: not the order the tars hold, yet the same on every run.
    in_tar_order = sorted(keys[0])
    assert keys[0] != in_tar_order
    again = stream(shards, world=2, rank=0, workers=2)
    assert [x["__key__"] for x in islice(again._raw_from(0, 0), len(keys[0]))] == keys[0]


def epoch_batches(shards: Path, workers: int, epoch: int, start: int, rank: int = 1) -> list:
    loader, s = build_shard_loader(str(shards), "pil", CROPS, 2, workers, 0, rank, 2, False, 10)
    s.set_epoch(epoch)
    s.set_start_batch(start)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_continues_with_the_uninterrupted_batches(shards, workers):
    epoch1 = epoch_batches(shards, workers, 1, 0)
    assert len(epoch1) == 10  # 40 samples / (2 ranks x batch 2)
    resumed = epoch_batches(shards, workers, 1, 3)
    assert len(resumed) == 7
    for a, b in zip(epoch1[3:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True)) and torch.equal(a[1], b[1])
    # Epochs differ (the streams go on), batches differ within one.
    epoch0 = epoch_batches(shards, workers, 0, 0)
    assert not torch.equal(epoch0[0][0][0], epoch1[0][0][0])
    assert not torch.equal(epoch1[0][0][0], epoch1[1][0][0])


def test_an_unreadable_sample_is_replaced_and_counted(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    with wds.TarWriter(str(bad / "shard-000003.tar")) as w:  # 7 samples, the 3rd broken
        for n in range(7):
            img = io.BytesIO()
            if n != 2:
                from PIL import Image

                Image.new("RGB", (40, 40), (n * 30, 0, 0)).save(img, format="PNG")
            w.write({"__key__": f"x{n}", "png": img.getvalue() or b"junk", "cls": b"1"})
    with pytest.warns(UserWarning, match="skipping unreadable image .*shard-000003.tar:x2"):
        # Both ranks over two epochs read the whole first pass (each stream's 3 shards), so x2 too.
        batches = [b for rank in (0, 1) for epoch in (0, 1) for b in epoch_batches(bad, 0, epoch, 0, rank)]
    assert sum(b[2] for b in batches) >= 1
    assert all(b[0][0].shape == (2, 3, 32, 32) for b in batches)


def test_too_few_shards_for_the_workers_is_named(shards):
    with pytest.raises(DataError, match="has 6 shard\\(s\\), fewer than 2 process\\(es\\) x 4 loader"):
        build_shard_loader(str(shards), "pil", CROPS, 2, 4, 0, 0, 2, False)


@pytest.mark.slow
def test_training_on_shards_stopped_and_resumed_equals_uninterrupted(shards, tmp_path):
    extra = ("data.format=shards", "data.num_workers=2", "train.num_threads=1", "data.shuffle_buffer=20")

    def run(out: Path, *more: str):
        # tiny_overrides names <data>/train: the shards folder is shards.parent / "train"
        return train(load_config(None, tiny_overrides(shards.parent, out, *extra, *more)))

    full = run(tmp_path / "full", "train.max_steps=7")
    assert full.step == 7  # 40 samples / batch 8 = 5 steps per epoch: stopped inside epoch 1
    assert run(tmp_path / "resumed", "train.max_steps=3").step == 3
    resumed = run(tmp_path / "resumed", "train.max_steps=7")
    for k, v in full.teacher.state_dict().items():
        assert torch.equal(v, resumed.teacher.state_dict()[k]), k
    assert torch.equal(full.center, resumed.center)
