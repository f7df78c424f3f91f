"""``dino-export``: a checkpoint's backbone (the teacher by default) in the formats other tools load.

    dino-export --checkpoint runs/demo/checkpoint.pth --format hf --output exports/hf
    dino-export --checkpoint dino_deitsmall16_pretrain.pth --format onnx --output exports/onnx

- ``hf``: ``config.json`` and ``model.safetensors`` in the layout of the hub's ``facebook/dino-vits16``;
  ``transformers.ViTModel.from_pretrained(DIR)`` loads it (release-style ViTs, no registers).
- ``onnx``: ``model.onnx``, (batch, C, S, S) images (C = 3, or a multi-band backbone's bands) -> (batch,
  D) features, dynamic batch axis; checked against torch with onnxruntime when it is installed.
- ``timm``: ``model.safetensors`` and ``timm_config.json`` (the timm name and kwargs);
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=DIR/"model.safetensors"),
  num_classes=0, **kwargs)`` loads it.
- ``safetensors``: ``model.safetensors`` alone, timm's (= the release's) key names.
Every file is written atomically; ``export.json`` records what was exported from where.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_train.models.loading import input_bands
from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.files import CheckpointError, check_writable_dir, write_json
from eval.common import add_backbone_args, backbone_from_args, run_tool
from eval.flags import whole

FORMATS = ("hf", "onnx", "timm", "safetensors")


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file  # a timm dependency

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp))
    tmp.replace(path)
    return path


def hf_config(model: nn.Module) -> dict[str, Any]:
    """transformers' ViTConfig of a release-style timm ViT."""
    blk = model.blocks[0]
    if getattr(model, "reg_token", None) is not None or getattr(model, "no_embed_class", False):
        raise CheckpointError("--format hf: transformers' ViTModel has no register tokens; use timm or onnx")
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": int(model.embed_dim),
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": int(blk.attn.num_heads),
        "intermediate_size": int(blk.mlp.fc1.out_features),
        "hidden_act": "gelu",
        "layer_norm_eps": float(blk.norm1.eps),
        "image_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "num_channels": input_bands(model),
        "qkv_bias": blk.attn.qkv.bias is not None,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    }


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ViT weights under transformers' ViTModel names (qkv split into query, key, value)."""
    sd, out = model.state_dict(), {}
    out["embeddings.cls_token"] = sd["cls_token"]
    out["embeddings.position_embeddings"] = sd["pos_embed"]
    for n in ("weight", "bias"):
        out[f"embeddings.patch_embeddings.projection.{n}"] = sd[f"patch_embed.proj.{n}"]
        out[f"layernorm.{n}"] = sd[f"norm.{n}"]
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for n in ("weight", "bias"):
            for part, piece in zip(
                ("query", "key", "value"), sd[src + f"attn.qkv.{n}"].chunk(3), strict=True
            ):
                out[dst + f"attention.attention.{part}.{n}"] = piece
            out[dst + f"attention.output.dense.{n}"] = sd[src + f"attn.proj.{n}"]
            out[dst + f"intermediate.dense.{n}"] = sd[src + f"mlp.fc1.{n}"]
            out[dst + f"output.dense.{n}"] = sd[src + f"mlp.fc2.{n}"]
            out[dst + f"layernorm_before.{n}"] = sd[src + f"norm1.{n}"]
            out[dst + f"layernorm_after.{n}"] = sd[src + f"norm2.{n}"]
    return out


def export_hf(model: nn.Module, out: Path) -> list[Path]:
    config = hf_config(model)
    write_json(out / "config.json", config)
    return [out / "config.json", _save_safetensors(hf_state_dict(model), out / "model.safetensors")]


def export_onnx(model: nn.Module, out: Path, image_size: int) -> list[Path]:
    x = torch.randn(2, input_bands(model), image_size, image_size)
    path, tmp = out / "model.onnx", out / ".model.onnx.tmp"
    torch.onnx.export(
        model, (x,), str(tmp), input_names=["images"], output_names=["features"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    tmp.replace(path)
    return [path]


def export_timm(model: nn.Module, info: dict[str, Any], out: Path, with_config: bool) -> list[Path]:
    files = [_save_safetensors(model.state_dict(), out / "model.safetensors")]
    if with_config:
        cfg = {"timm_name": info["timm_name"], "kwargs": info["timm_kwargs"], "num_classes": 0}
        write_json(out / "timm_config.json", cfg)
        files.append(out / "timm_config.json")
    return files


def check_onnx(model: nn.Module, path: Path, image_size: int) -> float | None:
    """Max |onnxruntime - torch| on a batch of 3 (another batch size than exported); None without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = torch.randn(3, input_bands(model), image_size, image_size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        return float((torch.from_numpy(got) - model(x)).abs().max())


def export(model: nn.Module, info: dict[str, Any], fmt: str, out: Path, image_size: int) -> list[Path]:
    """Write ``model`` (a backbone from ``dino_train.models.loading.load_backbone``) to ``out`` in ``fmt``."""
    check_writable_dir(out, "--output")
    model = model.cpu().float().eval()
    if fmt == "hf":
        return export_hf(model, out)
    if fmt == "onnx":
        return export_onnx(model, out, image_size)
    return export_timm(model, info, out, with_config=fmt == "timm")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dino-export", description=__doc__, formatter_class=HelpFormatter)
    add_backbone_args(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, type=Path, help="folder for the exported files")
    p.add_argument(
        "--image-size", type=whole(1), default=224, help="onnx: the traced input size (default 224)"
    )
    p.add_argument("--no-progress", action="store_true", help="accepted by every tool; this one draws no bar")
    args = p.parse_args(argv)
    return run_tool(lambda: _run(args), (ValueError,))


def clear_previous_export(out: Path) -> None:
    """Remove an earlier export from ``out``: its ``export.json`` first, then the files it lists. Each file
    is written atomically and ``export.json`` last, so after an export cut short (kill -9) the folder
    never pairs new files with an old record or an old model with a new config; the same command then
    writes the whole set again."""
    record_path = out / "export.json"
    try:
        listed = json.loads(record_path.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    record_path.unlink(missing_ok=True)
    for name in listed if isinstance(listed, list) else []:
        if isinstance(name, str) and Path(name).name == name:  # names inside out/ only, never a path
            (out / name).unlink(missing_ok=True)
    for stale in out.iterdir() if out.is_dir() else []:  # what an export cut short left half-written
        if stale.is_file() and _TEMPORARY.match(stale.name):
            stale.unlink(missing_ok=True)


# The temporary names of an export's writes: ours (``.model.onnx.tmp``, ``.config.json.tmp-PID``) and
# safetensors' (``.tmpXXXXXX``, renamed onto ours when whole).
_TEMPORARY = re.compile(r"^\.(tmp[A-Za-z0-9]{6}|.+\.tmp(-\d+)?)$")


def _run(args: argparse.Namespace) -> None:
    check_writable_dir(args.output, "--output")  # before the checkpoint is read
    model, info = backbone_from_args(args)
    if args.format == "hf":
        hf_config(model)  # its refusals (registers) before anything of an earlier export is removed
    clear_previous_export(args.output)
    files = export(model, info, args.format, args.output, args.image_size)
    record = {"format": args.format, "source": info["path"], "checkpoint_key": info.get("checkpoint_key")}
    record |= {"arch": info["arch"], "timm_name": info["timm_name"], "files": [f.name for f in files]}
    if info.get("input_stats") is not None:  # a multi-band backbone: its inputs' per-band normalisation
        record["input_stats"] = info["input_stats"]
    if args.format == "onnx":
        record["onnxruntime_max_abs_diff"] = check_onnx(model, files[0], args.image_size)
    write_json(args.output / "export.json", record)
    print(
        f"exported {info['arch']} from {info['path']} as {args.format}: " + ", ".join(str(f) for f in files)
    )
    if record.get("onnxruntime_max_abs_diff") is not None:
        print(f"onnxruntime vs torch: max abs difference {record['onnxruntime_max_abs_diff']:.2e}")


if __name__ == "__main__":
    raise SystemExit(main())
