"""Load a frozen backbone from any of the files people evaluate.

Accepted, told apart by their contents:

- our training checkpoints (``teacher``: ``backbone.*``/``head.*``; ``student``: ``module.backbone.*``);
- the original release's full checkpoints (the same layout plus a pickled ``argparse.Namespace`` ``args``);
- backbone-only state dicts: the release's ``dino_deitsmall16_pretrain.pth`` and our ``teacher_backbone.pth``;
- the release's ResNet-50 and XCiT files (``dino_resnet50_pretrain.pth``, ``dino_xcit_*``);
- ``timm:<model name>`` with a local ``weights`` file (nothing is ever downloaded).

The architecture comes from what our checkpoints record (the timm name and kwargs), else it is read from
the weights (``dino_train.models.architecture``), so the user does not have to repeat it; when they do, a
value that does not fit is an error naming what the weights are.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dino_train.models.architecture import Inferred, from_recorded, infer_backbone, read_spec_sidecar
from dino_train.models.backbone import BackboneSpec, backbone_spec, build_from_spec
from dino_train.runtime.checksums import verify_sidecar
from dino_train.runtime.files import CheckpointError, UnsafeCheckpointError, strip_prefix
from dino_train.runtime.safe_load import load_error_reason, load_verified

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_LIST_LIMIT = 12  # keys shown per category in a mismatch report


def read_file(path: Path, trust: bool = False) -> tuple[Any, list[str]]:
    """The file's contents on the CPU, and notes for the user. Never runs code from the file unless
    ``trust`` (the CLIs' ``--trust-checkpoint``).

    ``.pth``: ``torch.load(weights_only=True)`` allowing the release's pickled ``args`` (see
    ``safe_torch_load``); any other pickled class or function is refused with a CheckpointError naming it,
    or, with ``trust``, loaded by the full unpickler with a warning and a note. Checksums are verified
    where present (our checkpoints' ``_checksum``, a ``<file>.sha256`` sidecar); a mismatch is an error.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file inside it (e.g. checkpoint.pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # a timm dependency

        verify_sidecar(path)
        try:
            return load_file(str(path), device="cpu"), []
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {_reason(err)}") from err
    try:
        return load_verified(path, "cpu"), []
    except UnsafeCheckpointError as err:
        if not trust:
            raise
        note = (
            f"{path} holds a pickled {err.global_name}; loaded with weights_only=False because it is trusted"
        )
        return load_verified(path, "cpu", trust=True), [note]


def _reason(err: Exception) -> str:
    """The informative part of a load error, on one line (torch's advice to rerun with
    weights_only=False is wrong for a file that is not a checkpoint, and unsafe for the rest)."""
    return load_error_reason(err)


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
    """The backbone's weights and the keys dropped: ``module.`` is stripped from key starts; when keys
    carry the wrapper's ``backbone.`` prefix, only those are kept (stripped), and the rest (the DINO head,
    an iBOT patch head, the mask token) are dropped. Without it every key is kept (a backbone-only file;
    a classifier there is dropped once the model is known, by ``drop_classifier``)."""
    sd = strip_prefix(sd, "module.")
    if not any(k.startswith("backbone.") for k in sd):
        return sd, []
    kept = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return kept, sorted(k for k in sd if not k.startswith("backbone."))


def drop_classifier(
    model: nn.Module, sd: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys of a classifier the model does not have (timm names it ``head``, ``fc``, ``head.fc``, ...;
    it was removed with num_classes=0): dropped, and returned."""
    classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "head")
    expected = model.state_dict()
    extra = sorted(k for k in sd if k not in expected and k.startswith((classifier + ".", "head.", "fc.")))
    return {k: v for k, v in sd.items() if k not in extra}, extra


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
    return {
        "missing_keys": list(result.missing_keys),
        "unexpected_keys": sorted(set(sd) - set(usable)),
        "nonfinite_weights": warn_nonfinite(usable, path),
    }


def warn_nonfinite(sd: dict[str, torch.Tensor], path: Path) -> int:
    """The number of NaN/inf values among the floating-point weights of ``sd``, with a warning naming
    ``path``, the count and the first tensors holding them when there are any (a diverged run saves
    such weights; every feature computed from them is NaN, which the feature extraction refuses)."""
    counts = {
        k: int((~torch.isfinite(v)).sum()) for k, v in sd.items() if torch.is_floating_point(v) and v.numel()
    }
    bad = {k: n for k, n in counts.items() if n}
    total = sum(bad.values())
    if total:
        first = ", ".join(list(bad)[:3]) + (", ..." if len(bad) > 3 else "")
        warnings.warn(
            f"{path}: {total} of {sum(sd[k].numel() for k in counts)} weights are not finite (NaN or inf), "
            f"in {len(bad)} tensors ({first}); features from this backbone will not be finite",
            stacklevel=3,
        )
    return total


def _spec_for(
    obj: Any, sd: dict[str, torch.Tensor], path: Path, arch: str | None, patch_size: int | None
) -> tuple[BackboneSpec, Inferred | None]:
    """How to build the backbone: what our checkpoint (or the ``<file>.json`` beside a backbone-only file)
    recorded, else what the weights show, else ``arch`` (a timm name); a given ``arch`` or ``patch_size``
    must fit the weights."""
    recorded = from_recorded(obj.get("backbone")) if isinstance(obj, dict) else None
    recorded = recorded or read_spec_sidecar(path)  # teacher_backbone.pth.json, written by training
    try:
        inferred: Inferred | None = infer_backbone(sd, path)
    except CheckpointError:
        if recorded is None and arch is None:
            raise
        inferred = None
    seen = inferred or recorded
    if seen is not None and arch is not None and arch not in (seen.arch, seen.spec.timm_name):
        raise CheckpointError(f"{path}: weights are {seen.describe()}; arch {arch!r} does not fit them")
    if seen is not None and patch_size is not None and patch_size != seen.patch_size:
        raise CheckpointError(
            f"{path}: weights are {seen.describe()}; patch size {patch_size} does not fit them"
        )
    if seen is None:
        return backbone_spec(arch), None  # type: ignore[arg-type]
    return (recorded or seen).spec, inferred


def input_bands(model: nn.Module) -> int:
    """The number of bands a backbone's first convolution takes (3 for RGB models)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(first.in_channels) if first is not None else 3


def _finish(model: nn.Module, info: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    vit = isinstance(model, VisionTransformer)
    info.setdefault("in_chans", input_bands(model))
    info.setdefault("input_stats", None)
    info.setdefault("embed_dim", int(getattr(model, "num_features", 0)))
    info.setdefault("depth", len(getattr(model, "blocks", [])))
    info.setdefault("patch_size", int(model.patch_embed.patch_size[0]) if vit else None)
    info.setdefault("img_size", int(model.patch_embed.img_size[0]) if vit else None)
    model.requires_grad_(False)
    model.load_info = info  # lets later errors (non-finite features) name the file the model came from
    return model.eval(), info


def load_backbone(
    path: str | Path,
    checkpoint_key: str = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    strict: bool = True,
    weights: str | Path | None = None,
    trust: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen backbone in eval mode on the CPU whose forward gives (B, D) features, and an info dict
    (source, arch, timm_name, timm_kwargs, patch_size, img_size, embed_dim, depth, checkpoint_key,
    ignored_keys, notes, epoch, missing/unexpected keys).

    ``path``: a checkpoint file, or ``"timm:<name>"`` with ``weights`` a local file. ``checkpoint_key``
    picks ``teacher`` or ``student`` in full checkpoints (ignored for backbone-only files). ``arch`` (a
    release name or a timm name) and ``patch_size``, when given, must match the weights; ``arch`` names
    the model when the weights alone do not tell it. ``strict``: a key or shape mismatch is an error
    listing the differences; otherwise the fitting weights are loaded and the rest reported in info.
    ``trust``: allow pickled Python objects other than the release's plain ``args`` (runs code from the
    file: only for files you trust).
    """
    if str(path).startswith("timm:"):
        return _load_timm(str(path)[len("timm:") :], weights, checkpoint_key, strict, trust)
    path = Path(path)
    obj, notes = read_file(path, trust)
    raw, used_key = select_state_dict(obj, checkpoint_key, path)
    sd, dropped = clean_keys(raw)
    spec, inferred = _spec_for(obj, sd, path, arch, patch_size)
    try:
        model = build_from_spec(spec)
    except Exception as err:  # an unknown timm name or kwargs recorded by another timm version
        raise CheckpointError(f"{path}: cannot build {spec.timm_name} {spec.kwargs}: {err}") from err
    sd, classifier = drop_classifier(model, sd)
    dropped = sorted(dropped + classifier)
    if inferred is not None and inferred.family == "xcit":
        from timm.models.xcit import checkpoint_filter_fn  # the release's XCiT key layout -> timm's

        sd = checkpoint_filter_fn(dict(sd), model)
    report = _load_weights(model, sd, strict, path)
    source = "backbone-only"
    if used_key:
        source = "release-checkpoint" if "args" in obj else "training-checkpoint"
    info: dict[str, Any] = {
        "source": source,
        "path": str(path),
        "checkpoint_key": used_key or None,
        "arch": inferred.arch if inferred is not None else spec.timm_name,
        "timm_name": spec.timm_name,
        "timm_kwargs": dict(spec.kwargs),
        "ignored_keys": dropped,
        "notes": notes,
        "epoch": obj["epoch"] if used_key and isinstance(obj.get("epoch"), int) else None,
        "input_stats": spec.input_stats,  # a multi-band backbone's per-band normalisation
        **report,
    }
    return _finish(model, info)


def _load_timm(
    name: str, weights: str | Path | None, checkpoint_key: str, strict: bool, trust: bool
) -> tuple[nn.Module, dict[str, Any]]:
    if weights is None:
        raise CheckpointError(
            f"timm:{name} needs a local weights file (--weights FILE); nothing is downloaded"
        )
    wpath = Path(weights)
    obj, notes = read_file(wpath, trust)
    raw, used_key = select_state_dict(obj, checkpoint_key, wpath)
    sd, dropped = clean_keys(raw)
    if not timm.is_model(name):
        raise CheckpointError(f"timm has no model {name!r}")
    model = build_from_spec(backbone_spec(name))
    sd, extra = drop_classifier(model, sd)
    report = _load_weights(model, sd, strict, wpath)
    info: dict[str, Any] = {
        "source": "timm",
        "path": str(wpath),
        "checkpoint_key": used_key or None,
        "arch": f"timm:{name}",
        "timm_name": name,
        "timm_kwargs": {},
        "img_size": None,
        "ignored_keys": sorted(dropped + extra),
        "notes": notes,
        "epoch": None,
        **report,
    }
    return _finish(model, info)
