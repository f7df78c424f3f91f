"""No loader runs code from a file: a pickled global in a checkpoint is refused by every loader, CLI,
the notebook API and model.init_weights, naming the file and --trust-checkpoint; only trust runs it,
and the release's plain argparse args still load without trust."""

import argparse
import builtins
import pathlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dino_train.config import load_config
from dino_train.models import build_backbone
from dino_train.models.loading import load_backbone, read_file
from dino_train.runtime.files import (
    CheckpointError,
    UnsafeCheckpointError,
)
from dino_train.runtime.safe_load import safe_torch_load
from dino_train.train import train
from dino_train.train.checkpoint import CheckpointManager, load_file
from tests.helpers import tiny_overrides, training_state


class Payload:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint does to ``weights_only=False``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


GLOBAL_NAMES = {"open": "io.open", "exec": "builtins.exec"}  # as the error messages must name them
PAYLOADS = {
    "open": lambda marker: Payload(builtins.open, (str(marker), "w")),
    "exec": lambda marker: Payload(builtins.exec, (f"open({str(marker)!r}, 'w').write('ran')",)),
}


def release_like_state() -> dict:
    """A full checkpoint whose teacher is a ViT-Tiny/8 on a 32 px grid (``tiny_overrides`` + img_size=32)."""
    state = training_state(1)
    state["teacher"] = {f"backbone.{k}": v for k, v in build_backbone("vit_tiny", 8, 32).state_dict().items()}
    return state


def evil_checkpoint(path: Path, marker: Path, kind: str) -> Path:
    """A file that looks like a release checkpoint, with the payload as its 'args'."""
    torch.save(release_like_state() | {"args": PAYLOADS[kind](marker)}, path)
    return path


def test_the_payload_is_live_and_only_trust_runs_it(tmp_path, capsys):
    marker = tmp_path / "marker"
    bad = evil_checkpoint(tmp_path / "bad.pth", marker, "open")
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(bad)
    assert not marker.exists()
    obj, notes = read_file(bad, trust=True)  # the user vouched for the file: the full unpickler runs
    assert marker.exists(), "the payload did not run with weights_only=False: the tests below prove nothing"
    assert "weights_only=False" in notes[0] and "WARNING" in capsys.readouterr().err
    assert obj["epoch"] == 1


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_every_loader_refuses_a_pickled_global(tmp_path, kind):
    marker = tmp_path / "marker"
    bad = evil_checkpoint(tmp_path / "checkpoint-step00000001.pth", marker, kind)

    def refused(call):
        with pytest.raises(CheckpointError) as info:
            call()
        text = str(info.value)
        assert str(bad) in text and f"pickled {GLOBAL_NAMES[kind]}," in text, text
        assert "--trust-checkpoint" in text

    refused(lambda: load_backbone(bad))
    refused(lambda: read_file(bad))
    refused(lambda: load_file(bad))
    with pytest.warns(UserWarning, match=GLOBAL_NAMES[kind]):
        refused(lambda: CheckpointManager(tmp_path).load_latest())
    assert not marker.exists()


def refused_by_every_cli(
    tmp_path: Path, bad: Path
) -> dict[str, tuple[Callable[[list[str]], int], list[str]]]:
    """Each evaluation tool's ``main`` (what ``python -m <tool>`` runs) and its command line on ``bad``,
    with inputs that would otherwise get it past the checks made before the checkpoint is read."""
    from PIL import Image

    from eval.attention.cli import main as attention_main
    from eval.attention.visualize import main as visualize_main
    from eval.export import main as export_main
    from eval.knn.cli import main as knn_main
    from eval.linear.cli import main as linear_main

    for folder in ("data", "masks"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    ckpt = ["--checkpoint", str(bad), "--device", "cpu"]
    out = ["--output-dir", str(tmp_path / "out")]
    return {
        "eval_knn": (knn_main, [*ckpt, "--data", str(tmp_path / "data"), "--num-workers", "0"]),
        "eval_linear": (linear_main, [*ckpt, "--data", str(tmp_path / "data"), *out]),
        "visualize_attention": (
            visualize_main,
            [*ckpt, "--input", str(tmp_path / "img.png"), "--output", str(tmp_path / "vis")],
        ),
        "eval_attention": (
            attention_main,
            [*ckpt, "--images", str(tmp_path / "data"), "--masks", str(tmp_path / "masks"), *out],
        ),
        "dino-export": (
            export_main,
            ["--checkpoint", str(bad), "--format", "safetensors", "--output", str(tmp_path / "export")],
        ),
    }


def test_the_clis_refuse_it(tmp_path, capsys, one_thread):
    marker = tmp_path / "marker"
    bad = evil_checkpoint(tmp_path / "bad.pth", marker, "exec")
    for name, (main, argv) in refused_by_every_cli(tmp_path, bad).items():
        with pytest.raises(SystemExit) as stop:  # an input error: one line on stderr, exit status 2
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2, f"{name} exited {stop.value.code}: {err[-1500:]}"
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: {bad} holds a pickled builtins.exec,"), f"{name}: {err[-1500:]}"
        assert "--trust-checkpoint" in last and "Traceback" not in err, f"{name}: {err[-1500:]}"
    assert not marker.exists()


def test_the_notebook_api_refuses_it(tmp_path):
    import dino

    marker = tmp_path / "marker"
    bad = evil_checkpoint(tmp_path / "bad.pth", marker, "exec")
    with pytest.raises(CheckpointError, match=rf"{bad} holds a pickled builtins.exec, .*trust=True"):
        dino.load_backbone(bad, device="cpu")
    assert not marker.exists()


@pytest.mark.slow
def test_model_init_weights_refuses_it_and_the_run_does_not_start(tiny_data, tmp_path, one_thread):
    """A real run told to start from the file, which fits its model: only the pickle is at fault."""
    marker = tmp_path / "marker"
    bad = evil_checkpoint(tmp_path / "release.pth", marker, "exec")

    def run(path: Path, out: str, *extra: str):
        fits = ("model.img_size=32", f"model.init_weights={path}", *extra)
        return train(load_config(None, tiny_overrides(tiny_data, tmp_path / out, *fits)))

    with pytest.raises(CheckpointError, match=rf"{bad} holds a pickled builtins.exec,"):
        run(bad, "refused")
    assert not marker.exists() and not list((tmp_path / "refused").glob("checkpoint*.pth"))
    # The same weights with the release's plain args start a run.
    good = tmp_path / "good.pth"
    torch.save(release_like_state() | {"args": argparse.Namespace(arch="vit_tiny", patch_size=8)}, good)
    assert run(good, "started", "train.max_steps=1").step == 1


def test_release_style_args_load_without_trust(tmp_path):
    args = argparse.Namespace(
        arch="vit_small",
        patch_size=16,
        lr=0.0005,
        use_fp16=True,
        norm_last_layer=False,
        global_crops_scale=(0.4, 1.0),
        local_crops_scale=[0.05, 0.4],
        data_path="/datasets/imagenet/train",
        output_dir="/out",
        dist_url="env://",
        clip_grad=3.0,
        rank=0,
        world_size=16,
        gpu=0,
        local_rank=None,
    )
    path = tmp_path / "release.pth"
    torch.save(training_state(100) | {"args": args}, path)
    obj, notes = read_file(path)
    assert obj["args"] == args and notes == []
    assert load_file(path)["args"].world_size == 16
    # pathlib paths in args (forks): rebuilt from strings only, so allowed without trust.
    torch.save(training_state(1) | {"args": argparse.Namespace(out=pathlib.Path("/x/y"))}, path)
    assert read_file(path)[0]["args"].out == pathlib.Path("/x/y")
