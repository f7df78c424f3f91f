"""What a config allows, run: two steps of each combination in a covering set of sharding (ddp, fsdp) x
precision (fp32, bf16) x head options (BatchNorm, a free last layer, registers, iBOT, KoLeo on either
side, Sinkhorn-Knopp) x data format (folder, shards) x backbone family (ViT, ResNet, ConvNeXt), on one
process or two forked gloo ranks; and the combinations that cannot work, refused naming their keys.

Every pair of (sharding, precision, data format, family) values and every head option appears in some
row; the backbones are cut to two blocks where the family allows (timm_kwargs) so that the whole file
stays within a few seconds a row."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from dino_train.config import ConfigError, load_config
from dino_train.data.make_shards import main as make_shards
from dino_train.runtime import distributed as D
from dino_train.train import train
from tests.helpers import fork_ranks, tiny_overrides

VIT = ["model.timm_kwargs={depth: 2}"]
RESNET = ["model.arch=resnet18"]
CONVNEXT = ["model.arch=convnext_atto", "model.timm_kwargs={depths: [1, 1, 1, 1]}",
            "data.global_crops_size=64", "data.local_crops_size=32"]  # fmt: skip
BF16, SHARDS, BN = "train.precision=bf16", "data.format=shards", "model.use_bn_in_head=true"
FREE_LAST = "model.norm_last_layer=false"
IBOT, REGISTERS, SK = "ibot.loss_weight=1.0", "model.num_registers=2", "dino.centering=sinkhorn_knopp"
KOLEO_BOTTLENECK = ["dino.koleo_weight=0.1", "dino.koleo_on=bottleneck"]
KOLEO_BACKBONE = ["dino.koleo_weight=0.1", "dino.koleo_on=backbone"]

# (id, processes, sharding, overrides)
ROWS = [
    ("ddp-fp32-vit-folder-bn", 1, "ddp", [*VIT, BN]),
    ("ddp-bf16-vit-shards-ibot-registers-sk", 1, "ddp", [*VIT, BF16, SHARDS, IBOT, REGISTERS, SK]),
    ("ddp-fp32-resnet-shards-koleo-backbone", 1, "ddp", [*RESNET, SHARDS, *KOLEO_BACKBONE]),
    ("ddp-bf16-convnext-folder-bn-free-last-layer", 1, "ddp", [*CONVNEXT, BF16, BN, FREE_LAST]),
    ("ddp2-bf16-vit-folder-bn-koleo-bottleneck", 2, "ddp", [*VIT, BF16, BN, *KOLEO_BOTTLENECK]),
    ("fsdp2-bf16-vit-shards-bn-registers-sk", 2, "fsdp", [*VIT, BF16, SHARDS, BN, REGISTERS, SK]),
    (
        "fsdp2-fp32-vit-folder-ibot-koleo-free-last-layer",
        2,
        "fsdp",
        [*VIT, IBOT, *KOLEO_BOTTLENECK, FREE_LAST],
    ),
    ("fsdp2-fp32-resnet-shards-bn", 2, "fsdp", [*RESNET, SHARDS, BN]),
    ("fsdp2-fp32-convnext-folder-sk", 2, "fsdp", [*CONVNEXT, SK]),
]


@pytest.fixture(scope="module")
def both_formats(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """tiny_data's training images as a folder and as shards of 10 (4 shards: 2 ranks x 1 stream each)."""
    shards = tmp_path_factory.mktemp("combo_shards") / "train"
    assert make_shards([str(tiny_data / "train"), str(shards), "--shard-size", "10"]) == 0
    return {"folder": tiny_data, "shards": shards.parent}


def _rank(rank: int, port: int, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_PORT=str(port),
                      MASTER_ADDR="127.0.0.1")  # fmt: skip
    result = train(load_config(None, overrides))
    assert result.step == 2


@pytest.mark.slow
@pytest.mark.parametrize("name, procs, sharding, extra", ROWS, ids=[r[0] for r in ROWS])
def test_two_steps_of_each_combination(both_formats, tmp_path, name, procs, sharding, extra):
    data = both_formats["shards" if SHARDS in extra else "folder"]
    out = tmp_path / "run"
    more = ["train.max_steps=2", "train.num_threads=1", f"train.sharding={sharding}", *extra]
    overrides = tiny_overrides(data, out, *more)
    if procs == 1:
        assert train(load_config(None, overrides)).step == 2
    else:
        fork_ranks(_rank, D.free_port(), overrides, nprocs=procs)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == procs
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values() if v.is_floating_point())
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("kind") == "step"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (out / "teacher_backbone.pth").is_file()


@pytest.mark.parametrize(
    "extra, key",
    [
        ([*RESNET, REGISTERS], "model.num_registers: needs a ViT's patch tokens; resnet18 has none"),
        ([*CONVNEXT, IBOT], "ibot.loss_weight: needs a ViT's patch tokens; convnext_atto has none"),
        (["model.arch=resnet18", "train.sharding=fsdp", "optim.optimizer=lars"], "train.sharding=fsdp: LARS"),
    ],
    ids=["registers-on-a-cnn", "ibot-on-a-cnn", "fsdp-lars"],
)
def test_combinations_that_cannot_work_are_refused_by_key(tiny_data, tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key):
        train(load_config(None, tiny_overrides(tiny_data, tmp_path / "run", *extra)))
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_fp16_on_a_cpu_is_refused_by_key(tiny_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs where CUDA is")
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device"):
        train(load_config(None, tiny_overrides(tiny_data, tmp_path / "run", "train.precision=fp16")))
