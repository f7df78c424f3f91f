"""What the evaluation tools share: the backbone flags, process setup, class folders, result output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_train.data import DataError
from dino_train.data.bands import BandStats, backbone_band_stats
from dino_train.data.transforms import resize_for
from dino_train.runtime.cli import default_workers
from dino_train.runtime.device import pick_device
from dino_train.runtime.distributed import DistEnv, barrier, cleanup, detect_env, init_distributed
from dino_train.runtime.files import CheckpointError
from eval.flags import whole


class EvalExit(SystemExit):
    """Bad input to an evaluation tool, already printed on stderr as ``error: ...``: the process exits with
    status 2 like every other input error of the project. ``str()`` is that text, for callers that run a
    tool's ``main`` in-process (tests, ``launch.slurm_eval``)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def input_error(err: BaseException) -> BaseException:
    """What a tool's ``main`` raises for ``err``: an input error (CheckpointError, DataError, OutputDirError
    or a helper's ``SystemExit("error: ...")``) is printed on stderr and becomes an :class:`EvalExit`; a
    SystemExit carrying a status (submitit's exit after a requeue) is returned as it is."""
    if isinstance(err, EvalExit) or (isinstance(err, SystemExit) and not isinstance(err.code, str)):
        return err
    text = err.code if isinstance(err, SystemExit) else f"error: {err}"
    print(text, file=sys.stderr, flush=True)
    return EvalExit(text)


def add_size_args(parser: argparse.ArgumentParser, crop: int = 224) -> None:
    """``--crop`` and ``--resize``: the one preprocessing rule of every evaluation door (CLIs, ``dino.``)."""
    parser.add_argument("--crop", type=whole(1), default=crop, help="centre crop side in pixels")
    parser.add_argument(
        "--resize",
        type=whole(1),
        default=None,
        help="short side in pixels before the crop; default: crop * 256 / 224, the release's "
        "Resize(256) + CenterCrop(224) rule. Pass the crop size to keep the whole image (the demo does, "
        "on 64 px images)",
    )


def add_workers_arg(parser: argparse.ArgumentParser) -> None:
    """``--num-workers``: image-decoding processes, by default what fits this machine (every tool's)."""
    parser.add_argument(
        "--num-workers",
        type=whole(0),
        default=default_workers(),
        help="decoding processes (fits this machine)",
    )


def eval_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """(resize, crop) in pixels from ``add_size_args``'s flags."""
    return (args.resize or resize_for(args.crop)), args.crop


def backbone_record(info: dict[str, Any]) -> dict[str, Any]:
    """What a result file records about the backbone: ``load_backbone``'s info without the key lists,
    and the epoch counted as the training log counts it.

    A checkpoint's ``epoch`` entry (ours and the release's) is the epoch to run next, i.e. the number of
    completed epochs; the training log and run report name an epoch by its 0-based index. So a checkpoint
    written after 10 epochs is recorded as ``epoch`` 9 with ``epochs_completed`` 10 (None, None for a
    backbone-only file, which does not say)."""
    out = {k: v for k, v in info.items() if not k.endswith("_keys")}
    done = info.get("epoch")
    out["epochs_completed"] = done
    out["epoch"] = done - 1 if isinstance(done, int) and done >= 1 else None
    return out


def settings_record(args: argparse.Namespace, device: torch.device | str, world_size: int) -> dict[str, Any]:
    """Every flag of the run (paths as text), the device and the process count: what produced a result."""

    def plain(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, bool | int | float | str) else str(v)

    out = {k: plain(v) for k, v in sorted(vars(args).items())}
    if "crop" in out and out.get("resize") is None:
        out["resize"] = resize_for(int(out["crop"]))  # the size actually used, not the flag's None
    return out | {"device": str(device), "world_size": world_size}


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("backbone")
    g.add_argument("--checkpoint", help="our checkpoint.pth / teacher_backbone.pth, or a release .pth file")
    g.add_argument("--checkpoint-key", default="teacher", help="teacher or student, for full checkpoints")
    g.add_argument(
        "--arch",
        help="checked against the checkpoint: vit_tiny|vit_small|vit_base or a timm model name (which also "
        "names the model when the weights alone do not tell it); timm:<name> + --weights for timm weights",
    )
    g.add_argument("--patch-size", type=whole(1), help="checked against the checkpoint's patch size")
    g.add_argument("--weights", help="local weights file for --arch timm:<name> (nothing is downloaded)")
    g.add_argument("--non-strict", action="store_true", help="load the weights that fit and report the rest")
    g.add_argument(
        "--band-stats",
        help="per-band statistics (dino-data-stats) for a multi-band backbone whose file does not record "
        "them; ours do",
    )
    g.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="UNSAFE: also unpickle Python objects other than the release's plain args; this runs code "
        "from the file, so use it only for a file you made or trust (default: such files are refused)",
    )


def band_inputs(info: dict[str, Any], args: argparse.Namespace) -> tuple[BandStats | None, int | None]:
    """How to read and normalise the images for this backbone: (None, None) for an RGB one; for a
    multi-band one (docs/multiband.md) its per-band statistics, recorded in the file by training or
    given by ``--band-stats FILE``, and its number of bands. An N-band backbone without statistics is
    an error saying where to get them."""
    given = getattr(args, "band_stats", None)
    bands = int(info.get("in_chans") or 3)
    hint = f"give --band-stats FILE (dino-data-stats TRAIN_DIR --channels {bands} --out FILE)"
    try:
        stats = backbone_band_stats(info, given, hint)
    except DataError as err:
        raise SystemExit(f"error: --band-stats: {err}" if given else f"error: {err}") from err
    return (stats, bands) if stats is not None else (None, None)


def refuse_bands(info: dict[str, Any], tool: str) -> None:
    """For the tools that read RGB images only: a multi-band backbone is a clear error, not a shape
    mismatch deep inside the first forward."""
    bands = int(info.get("in_chans") or 3)
    if bands != 3 or info.get("input_stats") is not None:
        raise SystemExit(
            f"error: {tool} reads RGB images; {info.get('path')} is a {bands}-band backbone. Multi-band "
            "backbones are scored by eval_knn, eval_linear and dino.extract_features (docs/multiband.md)"
        )


def backbone_from_args(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Load the backbone the flags name; errors are CheckpointError with a readable message."""
    from dino_train.models.loading import load_backbone

    strict = not args.non_strict
    if args.arch and args.arch.startswith("timm:"):
        weights = args.weights or args.checkpoint  # either flag may name the timm weights file
        return load_backbone(
            args.arch, args.checkpoint_key, strict=strict, weights=weights, trust=args.trust_checkpoint
        )
    if not args.checkpoint:
        raise CheckpointError("give --checkpoint PATH, or --arch timm:NAME --weights FILE")
    return load_backbone(
        args.checkpoint, args.checkpoint_key, args.arch, args.patch_size, strict, trust=args.trust_checkpoint
    )


def setup_process(device: str) -> tuple[DistEnv, torch.device]:
    """Join the torchrun/Slurm process group if there is one; pick the device for this rank."""
    env = detect_env()
    dev = pick_device(device, env.local_rank)
    init_distributed(env, dev)
    return env, dev


# What every tool treats as bad input (a message for the user, not a traceback): unreadable or unfit
# checkpoints, data sets, and a helper's ``SystemExit("error: ...")``. A tool adds its own to these.
INPUT_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, DataError, SystemExit)


def run_tool(work: Callable[[], object], errors: tuple[type[BaseException], ...] = ()) -> int:
    """The one skeleton of every evaluation tool's ``main`` around its ``work``: wait for the other ranks
    when it is done, leave the process group whatever happens (``work`` joins it, with
    :func:`setup_process`, when the tool runs under torchrun), and turn an input error
    (``INPUT_ERRORS`` + ``errors``) into one ``error: ...`` line on stderr and exit status 2
    (:class:`EvalExit`). Returns 0."""
    try:
        work()
        barrier()
    except (*INPUT_ERRORS, *errors) as err:
        raise input_error(err) from None
    finally:
        cleanup()
    return 0


def split_roots(data: str | Path) -> tuple[Path, Path]:
    root = Path(data)
    train, val = root / "train", root / "val"
    for split in (train, val):
        if not split.is_dir():
            raise SystemExit(f"error: {split} is not a folder; --data needs train/ and val/ class folders")
    return train, val


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Print and return a plain aligned table; floats get two decimals."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_scalars(output_dir: Path, points: list[tuple[str, float, int]]) -> None:
    """TensorBoard scalars (tag, value, step) under ``output_dir/tensorboard``, in one event file."""
    from torch.utils.tensorboard import SummaryWriter  # slow import; only when results are written

    with SummaryWriter(log_dir=str(output_dir / "tensorboard")) as writer:
        for tag, value, step in points:
            writer.add_scalar(tag, value, step)
