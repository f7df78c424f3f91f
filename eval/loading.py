"""Load a frozen ViT backbone from any of the files people evaluate.

Accepted, told apart by their contents:

- our training checkpoints (``teacher``: ``backbone.*``/``head.*``; ``student``: ``module.backbone.*``);
- the original release's full checkpoints (the same layout plus a pickled ``argparse.Namespace`` ``args``);
- backbone-only state dicts: the release's ``dino_deitsmall16_pretrain.pth`` and our ``teacher_backbone.pth``;
- ``timm:<model name>`` with a local ``weights`` file (nothing is ever downloaded).

The architecture is read from the weights (embed dim, depth, patch size, position grid), so the user does
not have to repeat it, and when they do, a value that does not fit is an error naming what the weights are.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dino_train.models import ARCH_DIMS, build_backbone
from dino_train.runtime.files import CheckpointError, strip_prefix

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_LIST_LIMIT = 12  # keys shown per category in a mismatch report


@dataclass(frozen=True)
class VitSpec:
    """A ViT's shape as read from its weights."""

    arch: str
    embed_dim: int
    depth: int
    patch_size: int
    img_size: int  # pixels covered by the position grid: grid * patch_size

    def describe(self) -> str:
        grid = self.img_size // self.patch_size
        return (
            f"{self.arch}/{self.patch_size} (embed dim {self.embed_dim}, {self.depth} blocks, "
            f"{self.patch_size}x{self.patch_size} patches, {grid}x{grid} position grid = {self.img_size} px)"
        )


def read_file(path: Path) -> tuple[Any, list[str]]:
    """torch.load on the CPU with ``weights_only=True``, allowing the release's pickled ``args``.

    Falls back to ``weights_only=False`` (which can run code from the file) only when the safe loader
    refuses a pickled object; the returned notes say so.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file inside it (e.g. checkpoint.pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # a timm dependency

        try:
            return load_file(str(path), device="cpu"), []
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as err:
        # Only a refused Python class (e.g. a Path inside ``args``) justifies the unsafe loader; garbage
        # bytes also raise UnpicklingError ("Unsupported operand") and are simply not a checkpoint.
        if "Unsupported global" not in str(err):
            raise CheckpointError(f"{path} is not a checkpoint ({_reason(err)})") from err
        note = (
            f"{path} holds pickled Python objects besides tensors; loaded with weights_only=False, "
            "which trusts the file"
        )
        warnings.warn(note, stacklevel=3)
        try:
            return torch.load(path, map_location="cpu", weights_only=False), [note]
        except Exception as err2:
            raise CheckpointError(f"{path} is not a checkpoint ({_reason(err2)})") from err2
    except Exception as err:  # not a zip, truncated, not a torch file at all, ...
        raise CheckpointError(f"{path} is not a checkpoint ({_reason(err)})") from err


def _reason(err: Exception) -> str:
    """The informative part of a torch.load error: its advice to rerun with weights_only=False is wrong
    for a file that is not a checkpoint at all."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    return f"{type(err).__name__}: {text[:300]}"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(obj: Any, checkpoint_key: str, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors to load and where they came from: ``obj[checkpoint_key]`` or, for a backbone-only
    file, ``obj`` itself."""
    if isinstance(obj, dict) and checkpoint_key in obj:
        sd = obj[checkpoint_key]
        if not _is_state_dict(sd):
            raise CheckpointError(f"{path}: entry {checkpoint_key!r} is a {type(sd).__name__}, not weights")
        return sd, checkpoint_key
    if _is_state_dict(obj):
        return obj, ""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    weights = [k for k, v in obj.items() if _is_state_dict(v)]
    raise CheckpointError(
        f"{path} has no entry {checkpoint_key!r}; entries holding weights: {', '.join(weights) or 'none'} "
        f"(all entries: {', '.join(map(str, obj))}); pass one of them as the checkpoint key"
    )


def clean_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip ``module.`` then ``backbone.`` from key starts and drop ``head.*`` (the DINO projection head,
    or a classifier): returns the backbone weights and the dropped keys."""
    sd = strip_prefix(strip_prefix(sd, "module."), "backbone.")
    dropped = sorted(k for k in sd if k.startswith("head."))
    return {k: v for k, v in sd.items() if not k.startswith("head.")}, dropped


def infer_vit(sd: dict[str, torch.Tensor], path: Path | str) -> VitSpec:
    """Read arch, depth, patch size and position grid from backbone weights."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        shown = ", ".join(list(sd)[:8]) + (", ..." if len(sd) > 8 else "")
        raise CheckpointError(
            f"{path}: no ViT backbone weights (missing {', '.join(absent)}; keys: {shown}). A linear "
            "classifier or head file is not a backbone."
        )
    dim = int(sd["cls_token"].shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    tokens = int(sd["pos_embed"].shape[1]) - 1  # one position for the CLS token
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{path}: pos_embed has {tokens} patch positions, not a square grid")
    arch = next((a for a, (d, _, _) in ARCH_DIMS.items() if d == dim), None)
    if arch is None:
        known = ", ".join(f"{a} ({d})" for a, (d, _, _) in ARCH_DIMS.items())
        raise CheckpointError(f"{path}: embed dim {dim} matches no known arch; known: {known}")
    spec = VitSpec(arch, dim, depth, patch, grid * patch)
    if depth != ARCH_DIMS[arch][1]:
        raise CheckpointError(
            f"{path}: weights are {spec.describe()}, but {arch} has {ARCH_DIMS[arch][1]} blocks"
        )
    return spec


def state_dict_diff(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """Readable report of missing keys, unexpected keys and shape mismatches ('' when they match)."""

    def listing(title: str, items: list[str]) -> list[str]:
        if not items:
            return []
        more = [f"    ... and {len(items) - _LIST_LIMIT} more"] if len(items) > _LIST_LIMIT else []
        return [f"  {title} ({len(items)}):"] + [f"    {x}" for x in items[:_LIST_LIMIT]] + more

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k}: model {tuple(expected[k].shape)}, file {tuple(given[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if expected[k].shape != given[k].shape
    ]
    lines = listing("missing from the file", missing) + listing("unexpected in the file", unexpected)
    return "\n".join(lines + listing("shape mismatches", shapes))


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool, path: Path) -> dict[str, Any]:
    diff = state_dict_diff(model.state_dict(), sd)
    if diff and strict:
        raise CheckpointError(f"{path}: weights do not fit the model:\n{diff}")
    expected = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in expected and expected[k].shape == v.shape}
    result = model.load_state_dict(usable, strict=False)
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": sorted(set(sd) - set(usable))}


def _build_timm(name: str) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # not a ViT-like model: no dynamic_img_size argument
        return timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as err:  # unknown model name
        raise CheckpointError(f"timm has no model {name!r}: {err}") from err


def load_backbone(
    path: str | Path,
    checkpoint_key: str = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    strict: bool = True,
    weights: str | Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen backbone in eval mode on the CPU whose forward gives (B, D) features, and an info dict
    (source, arch, patch_size, img_size, embed_dim, depth, checkpoint_key, ignored_keys, notes, epoch).

    ``path``: a checkpoint file, or ``"timm:<name>"`` with ``weights`` a local file. ``checkpoint_key``
    picks ``teacher`` or ``student`` in full checkpoints (ignored for backbone-only files). ``arch`` and
    ``patch_size``, when given, must match the weights. ``strict``: a key or shape mismatch is an error
    listing the differences; otherwise the fitting weights are loaded and the rest reported in info.
    """
    if str(path).startswith("timm:"):
        return _load_timm(str(path)[len("timm:") :], weights, checkpoint_key, strict)
    path = Path(path)
    obj, notes = read_file(path)
    raw, used_key = select_state_dict(obj, checkpoint_key, path)
    sd, dropped = clean_keys(raw)
    spec = infer_vit(sd, path)
    if arch is not None and arch != spec.arch:
        raise CheckpointError(f"{path}: weights are {spec.describe()}; arch {arch!r} does not fit them")
    if patch_size is not None and patch_size != spec.patch_size:
        raise CheckpointError(
            f"{path}: weights are {spec.describe()}; patch size {patch_size} does not fit them"
        )
    model = build_backbone(spec.arch, spec.patch_size, spec.img_size)
    report = _load_weights(model, sd, strict, path)
    source = "backbone-only"
    if used_key:
        source = "release-checkpoint" if "args" in obj else "training-checkpoint"
    info: dict[str, Any] = {
        "source": source,
        "path": str(path),
        "checkpoint_key": used_key or None,
        **asdict(spec),
        "ignored_keys": dropped,
        "notes": notes,
        "epoch": obj["epoch"] if used_key and isinstance(obj.get("epoch"), int) else None,
        **report,
    }
    model.requires_grad_(False)
    return model.eval(), info


def _load_timm(
    name: str, weights: str | Path | None, checkpoint_key: str, strict: bool
) -> tuple[nn.Module, dict[str, Any]]:
    if weights is None:
        raise CheckpointError(
            f"timm:{name} needs a local weights file (--weights FILE); nothing is downloaded"
        )
    wpath = Path(weights)
    obj, notes = read_file(wpath)
    raw, used_key = select_state_dict(obj, checkpoint_key, wpath)
    sd, dropped = clean_keys(raw)
    model = _build_timm(name)
    # timm names each model's classifier ("head", "fc", "head.fc", ...); it was removed (num_classes=0).
    classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "head") + "."
    expected = model.state_dict()
    extra = sorted(k for k in sd if k.startswith(classifier) and k not in expected)
    sd = {k: v for k, v in sd.items() if k not in extra}
    dropped = sorted(dropped + extra)
    report = _load_weights(model, sd, strict, wpath)
    info: dict[str, Any] = {
        "source": "timm",
        "path": str(wpath),
        "checkpoint_key": used_key or None,
        "arch": f"timm:{name}",
        "embed_dim": int(getattr(model, "num_features", 0)),
        "depth": len(getattr(model, "blocks", [])),
        "patch_size": int(model.patch_embed.patch_size[0]) if hasattr(model, "patch_embed") else None,
        "img_size": None,
        "ignored_keys": dropped,
        "notes": notes,
        "epoch": None,
        **report,
    }
    model.requires_grad_(False)
    return model.eval(), info
