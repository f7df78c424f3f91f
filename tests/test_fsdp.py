"""train.sharding=fsdp (torch's FSDP2) on 2 and 3 CPU processes over gloo: the same steps as DDP, the
teacher held in shards, sharded checkpoints beside the release's files, resume at another world size."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from dino_train.config import ConfigError, load_config
from dino_train.runtime.files import CheckpointError
from dino_train.train.sharding import check_fsdp, restore_sharded
from tests.helpers import REPO, tiny_overrides, torchrun

# batch 4 per rank: 5 steps per epoch on 2 processes, 3 on 3; a checkpoint every step, one kept. SGD
# with a large step: its update is linear in the gradient, so FSDP's and DDP's differ by float rounding
# only (AdamW's first steps are about lr * sign(gradient), which turns rounding of a near-zero gradient
# into differences of the size of lr), and the weights move far beyond that tolerance.
EXTRA = (
    "optim.optimizer=sgd",
    "optim.lr=0.1",
    "optim.warmup_epochs=0",
    "dino.momentum_teacher=0.9",  # the teacher moves a tenth of the student's way each step
    "data.batch_size_per_gpu=4",
    "train.num_threads=1",
    "train.checkpoint_every_steps=1",
    "train.keep_last=1",
)
RANK_SCRIPT = str(REPO / "tests" / "fsdp_rank.py")


@pytest.fixture(scope="module")
def fsdp_run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """3 steps on 2 processes with FSDP: (output folder, gathered states before and after)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    over = tiny_overrides(tiny_data, out, *EXTRA, "train.sharding=fsdp", "train.max_steps=3")
    proc = torchrun(2, RANK_SCRIPT, str(out.parent / "dump.pt"), *over, timeout=600)
    assert proc.returncode == 0, _both_ends(proc.stderr)
    return out, torch.load(out.parent / "dump.pt", weights_only=True)


def assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_steps_equal_ddp_steps(fsdp_run, tiny_data, tmp_path):
    out, dump = fsdp_run
    ddp_out = tmp_path / "ddp"
    over = tiny_overrides(tiny_data, ddp_out, *EXTRA, "train.max_steps=3")
    proc = torchrun(2, "dino_train/main.py", *over, timeout=600)
    assert proc.returncode == 0, _both_ends(proc.stderr)
    ddp = torch.load(ddp_out / "checkpoint.pth", weights_only=True)
    fsdp = torch.load(out / "checkpoint.pth", weights_only=True)
    assert fsdp["step"] == ddp["step"] == 3 and fsdp["world_size"] == 2
    # checkpoint.pth keeps the release's layout, with the whole models gathered on rank 0.
    assert_close(ddp["student"], fsdp["student"], "student")
    assert_close(ddp["teacher"], fsdp["teacher"], "teacher")
    assert_close(ddp["dino_loss"], fsdp["dino_loss"], "center")
    for part, least in (("student", 1e-3), ("teacher", 1e-4)):  # moved well beyond the tolerance
        key = "backbone.blocks.0.attn.qkv.weight"
        assert (dump["after"][part][key] - dump["before"][part][key]).abs().max() > least, part
    backbone = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert backbone.keys() == {k[len("backbone.") :] for k in fsdp["teacher"] if k.startswith("backbone.")}
    assert torch.equal(
        backbone["blocks.0.attn.qkv.weight"], fsdp["teacher"]["backbone.blocks.0.attn.qkv.weight"]
    )
    # Each rank holds about half of the teacher, never all of it; the shards cover it.
    held = dump["held"]
    assert (held[:, 0] < 0.6 * held[:, 1]).all() and held[:, 0].sum() >= held[0, 1]
    # The optimizer state lives in the sharded folder only; keep_last=1 pruned the older ones.
    assert fsdp["optimizer"] == {} and fsdp["sharded_state"] == "sharded/step00000003"
    assert sorted(p.name for p in (out / "sharded").iterdir()) == ["step00000003"]
    assert (out / "sharded" / "step00000003" / ".metadata").is_file()


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_resumes_at_another_world_size(fsdp_run, tiny_data, tmp_path):
    src, dump = fsdp_run
    out = tmp_path / "three"
    shutil.copytree(src, out)
    over = tiny_overrides(tiny_data, out, *EXTRA, "train.sharding=fsdp", "train.max_steps=4")
    proc = torchrun(3, RANK_SCRIPT, str(tmp_path / "dump3.pt"), *over, timeout=600)
    assert proc.returncode == 0, _both_ends(proc.stderr)
    three = torch.load(tmp_path / "dump3.pt", weights_only=True)
    assert any("world size 2 -> 3" in n for n in three["notes"]), three["notes"]
    # What 3 processes restored from 2 processes' shards is exactly what the 2 held, optimizer included.
    for part in ("student", "teacher"):
        for k, v in dump["after"][part].items():
            assert torch.equal(v, three["before"][part][k]), f"{part}: {k}"
    a, b = dump["after"]["optimizer"]["state"], three["before"]["optimizer"]["state"]
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"optimizer: {name}.{k}"
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 3 and ckpt["step"] == 4 and ckpt["sharded_state"] == "sharded/step00000004"


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("mode", ["die-in-save", "hang-in-save"])
def test_a_rank_lost_in_a_sharded_save_leaves_the_last_checkpoint_good(fsdp_run, tiny_data, tmp_path, mode):
    """Rank 1 killed (kill -9) or hung in the middle of step 2's sharded save, its own shards written:
    the run ends in bounded time, step 1's checkpoint and folder stay whole, the unfinished folder never
    takes a finished one's name, and the same command then ends where the uninterrupted run did."""
    _, uninterrupted = fsdp_run
    out = tmp_path / "cut"
    over = tiny_overrides(tiny_data, out, *EXTRA, "train.sharding=fsdp", "train.max_steps=3")
    over.append("train.dist_timeout_s=5")
    start = time.time()
    proc = torchrun(2, str(REPO / "tests" / "fault_rank.py"), mode, "2", *over, timeout=300)
    assert proc.returncode != 0, _both_ends(proc.stderr)
    assert time.time() - start < 120, "the group did not end in bounded time"
    if mode == "die-in-save":  # torchrun names the rank and the signal as the root cause
        assert "Signal 9 (SIGKILL) received" in proc.stderr, _both_ends(proc.stderr)
    else:  # rank 0 names what happened and that the last checkpoint is good
        assert "PEER ERROR" in proc.stderr, _both_ends(proc.stderr)
        assert "train.dist_timeout_s=5" in proc.stderr
        assert f"last complete checkpoint in {out} is intact" in proc.stderr
    last = torch.load(out / "checkpoint.pth", weights_only=True)
    assert last["step"] == 1 and last["sharded_state"] == "sharded/step00000001"
    assert (out / "sharded" / "step00000001" / ".metadata").is_file()
    assert not (out / "sharded" / "step00000002").exists()
    if mode == "hang-in-save":
        return  # the files left are a dead rank's; resuming them once is enough for the suite's time
    # Step 1 is in the first epoch, whose prototypes are frozen (freeze_last_layer): their optimizer state
    # is absent from the checkpoint, and resuming it once failed asking for it.
    proc = torchrun(2, RANK_SCRIPT, str(tmp_path / "dump.pt"), *over, timeout=600)
    assert proc.returncode == 0, _both_ends(proc.stderr)
    resumed = torch.load(tmp_path / "dump.pt", weights_only=True)
    for part in ("student", "teacher"):
        assert_close(resumed["after"][part], uninterrupted["after"][part], part)
    assert sorted(p.name for p in (out / "sharded").iterdir()) == ["step00000003"]  # the .tmp pruned


@pytest.mark.slow
def test_fsdp_bf16_trains_a_batchnorm_head(tiny_data, tmp_path):
    """The demo's head (use_bn_in_head) under FSDP's bf16: its BatchNorm once died in the teacher's forward
    ("expected scalar type BFloat16 but found Float": bf16 weights, fp32 running statistics)."""
    out = tmp_path / "bn"
    over = tiny_overrides(tiny_data, out, *EXTRA, "train.sharding=fsdp", "train.max_steps=2")
    over += ["train.precision=bf16", "model.use_bn_in_head=true"]
    proc = torchrun(2, "dino_train/main.py", *over, timeout=600)
    assert proc.returncode == 0, _both_ends(proc.stderr)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 2
    norm = {k: v for k, v in ckpt["teacher"].items() if k.startswith("head.mlp.1.")}
    assert norm["head.mlp.1.weight"].dtype == torch.float32  # the master weights stay fp32
    assert int(norm["head.mlp.1.num_batches_tracked"]) > 0  # it ran, and in training mode
    assert torch.isfinite(norm["head.mlp.1.running_var"]).all()


@pytest.mark.parametrize(
    "extra, key",
    [
        (["optim.optimizer=lars"], "LARS"),
        (["monitor.knn_data=/x"], "monitor.knn_data"),
        (["monitor.attention_images=/x"], "monitor.attention_images"),
    ],
)
def test_what_fsdp_does_not_support_is_refused(tiny_data, tmp_path, extra, key):
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, "train.sharding=fsdp", *extra))
    with pytest.raises(ConfigError, match=key):
        check_fsdp(cfg, "fp32")
    with pytest.raises(ConfigError, match="fp16"):
        check_fsdp(load_config(None, tiny_overrides(tiny_data, tmp_path)), "fp16")


def test_a_ddp_checkpoint_is_not_restored_into_fsdp(tmp_path):
    with pytest.raises(CheckpointError, match="written with train.sharding=ddp"):
        restore_sharded(None, {"step": 3}, tmp_path / "checkpoint.pth")


def _both_ends(stderr: str) -> str:
    """The ranks' own messages come first, torchrun's summary last: show both (a rank once aborted at exit
    with only "terminate called without an active exception" left in the tail)."""
    return stderr if len(stderr) <= 6000 else f"{stderr[:3000]}\n[...]\n{stderr[-3000:]}"
