"""One config schema for training, shared by torchrun, Slurm and eval.

Three layers, merged once: the dataclass defaults below (the original DINO release's ``main_dino.py``
defaults) < a recipe yaml that holds only what differs < ``section.key=value`` overrides from the command
line. Every key and value is checked before any compute, and errors name the key at fault.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARCHS = ("vit_tiny", "vit_small", "vit_base")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "sgd", "lars")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"
    patch_size: int = 16
    # Position-embedding grid size in pixels; 0 means data.global_crops_size (224 for the release's weights).
    img_size: int = 0
    drop_path_rate: float = 0.1  # student only; the teacher never drops paths
    out_dim: int = 65536
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256


@dataclass
class DataConfig:
    path: str = ""  # a class-folder data set (ImageFolder layout) or a flat folder of images
    batch_size_per_gpu: int = 64
    num_workers: int = 10
    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.4)


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 0.0005  # for a total batch of 256; scaled linearly with the real total batch
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter gradient norm limit; 0 disables
    freeze_last_layer: int = 1  # epochs during which the prototypes do not move


@dataclass
class DinoConfig:
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    # "epoch" indexes the teacher temperature by epoch as the original release does; "step" interpolates
    # per iteration as dinov2 does.
    teacher_temp_schedule: str = "epoch"
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class TrainConfig:
    epochs: int = 100
    precision: str = "auto"  # auto: bf16 (fp16 without) on CUDA; on CPU bf16 if measured faster, else fp32
    seed: int = 0
    output_dir: str = "runs/dino"
    device: str = "auto"
    num_threads: int = 0  # torch intra-op threads per process; 0 keeps torch's default
    saveckp_freq: int = 20  # also keep checkpoint{epoch:04}.pth every this many epochs; 0 disables
    checkpoint_every_steps: int = 0  # mid-epoch checkpoints; 0 writes at epoch ends only
    keep_last: int = 3  # rolling checkpoints kept for resume
    log_every_steps: int = 10
    max_steps: int = 0  # stop (with a checkpoint) after this many optimizer steps in total; 0 = no limit
    # Memory levers: the batch runs as this many micro-batches (center and teacher updated once per step),
    # and activations are recomputed per block in the backward pass instead of being kept.
    accumulation_steps: int = 1
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the backbones (first steps are slow while it compiles)
    # scaled_dot_product_attention or the explicit softmax(q k^T): "auto" is fused on CUDA and explicit on
    # CPU, where bench/train_step.py measured explicit faster in bf16 (1.9 s vs 2.7 s per ViT-S/16 step).
    fused_attention: str = "auto"
    max_nonfinite_steps: int = 10  # consecutive skipped non-finite steps before the run stops
    # How long a rank waits in a collective for a dead or hung peer before the run stops with an error.
    dist_timeout_s: float = 1800.0
    resume: bool = True
    progress_bar: bool = True


@dataclass
class MonitorConfig:
    # Periodic k-NN on a labelled folder with train/ and val/ class folders; "" disables it.
    knn_data: str = ""
    knn_every_epochs: int = 1
    knn_ks: tuple[int, ...] = (10, 20)
    knn_temperature: float = 0.07
    knn_resize: int = 0  # 0: data.global_crops_size * 256 / 224, as the release's 256 / 224
    knn_crop: int = 0  # 0: data.global_crops_size
    knn_batch_size: int = 128
    # Attention maps of the images in this folder (a few) logged to TensorBoard; "" disables it.
    attention_images: str = ""
    attention_every_epochs: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# ---------------------------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{n}" for n in hints)
            raise ConfigError(f"unknown key {key!r}; known keys here: {known}")
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
            _apply(getattr(section, name), value, f"{key}.")
        else:
            setattr(section, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {err}") from err
    # YAML reads "1e-3" as a string; accept the usual float spellings.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and not value.isalpha() else value
        except ValueError:
            pass
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a checked Config from the schema defaults, an optional recipe yaml and key=value overrides."""
    cfg = merge_into(Config(), path, overrides)
    validate(cfg)
    return cfg


def merge_into(cfg: Any, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Merge a yaml file and ``key=value`` overrides into the dataclass instance ``cfg`` (any schema:
    training and eval share this), checking every key and type. Returns ``cfg``."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        try:
            _apply(cfg, data, "")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a checked Config from ``to_dict`` output (as stored in checkpoints)."""
    cfg = Config()
    _apply(cfg, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (lists, not tuples) so it round-trips through YAML and torch.load(weights_only=True)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ------------------------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_scale(scale: tuple[float, float], key: str) -> None:
    lo, hi = scale
    _check(0 < lo <= 1 and 0 < hi <= 1, key, f"crop scales must lie in (0, 1], got {list(scale)}")
    _check(lo <= hi, key, f"lower scale {lo} is above upper scale {hi}")


def validate(cfg: Config) -> None:
    """Reject impossible values before any compute. Checks that need the hardware live in precision.py."""
    m, d, o, k, t = cfg.model, cfg.data, cfg.optim, cfg.dino, cfg.train
    _check(m.arch in ARCHS, "model.arch", f"{m.arch!r} is not one of {', '.join(ARCHS)}")
    _check(m.patch_size > 0, "model.patch_size", f"must be positive, got {m.patch_size}")
    _check(m.img_size >= 0, "model.img_size", f"must be 0 or positive, got {m.img_size}")
    if m.img_size:
        _check(
            m.img_size % m.patch_size == 0,
            "model.img_size",
            f"{m.img_size} is not a multiple of the patch size {m.patch_size}",
        )
    _check(0 <= m.drop_path_rate < 1, "model.drop_path_rate", f"must lie in [0, 1), got {m.drop_path_rate}")
    _check(m.out_dim > 0, "model.out_dim", f"must be positive, got {m.out_dim}")
    _check(m.head_nlayers >= 1, "model.head_nlayers", f"must be at least 1, got {m.head_nlayers}")
    _check(m.head_hidden_dim > 0, "model.head_hidden_dim", "must be positive")
    _check(m.head_bottleneck_dim > 0, "model.head_bottleneck_dim", "must be positive")

    _check(d.path != "", "data.path", "is required: a class-folder data set or a folder of images")
    _check(
        d.batch_size_per_gpu > 0, "data.batch_size_per_gpu", f"must be positive, got {d.batch_size_per_gpu}"
    )
    _check(d.num_workers >= 0, "data.num_workers", f"must be 0 or more, got {d.num_workers}")
    for name in ("global_crops_size", "local_crops_size"):
        size = getattr(d, name)
        _check(size > 0, f"data.{name}", f"must be positive, got {size}")
        _check(
            size % m.patch_size == 0,
            f"data.{name}",
            f"{size} is not a multiple of model.patch_size={m.patch_size}",
        )
    _check(
        d.local_crops_number >= 0, "data.local_crops_number", f"must be 0 or more, got {d.local_crops_number}"
    )
    _check_scale(d.global_crops_scale, "data.global_crops_scale")
    _check_scale(d.local_crops_scale, "data.local_crops_scale")

    _check(
        o.optimizer in OPTIMIZERS, "optim.optimizer", f"{o.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"
    )
    _check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _check(o.min_lr >= 0, "optim.min_lr", f"must be 0 or more, got {o.min_lr}")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be 0 or more, got {o.warmup_epochs}")
    _check(
        o.warmup_epochs <= t.epochs,
        "optim.warmup_epochs",
        f"{o.warmup_epochs} warmup epochs is more than train.epochs={t.epochs}",
    )
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be 0 or more, got {o.weight_decay}")
    _check(o.weight_decay_end >= 0, "optim.weight_decay_end", f"must be 0 or more, got {o.weight_decay_end}")
    _check(o.clip_grad >= 0, "optim.clip_grad", f"must be 0 (off) or positive, got {o.clip_grad}")
    _check(
        o.freeze_last_layer >= 0, "optim.freeze_last_layer", f"must be 0 or more, got {o.freeze_last_layer}"
    )

    _check(
        0 <= k.momentum_teacher <= 1, "dino.momentum_teacher", f"must lie in [0, 1], got {k.momentum_teacher}"
    )
    _check(k.teacher_temp > 0, "dino.teacher_temp", f"must be positive, got {k.teacher_temp}")
    _check(
        k.warmup_teacher_temp > 0,
        "dino.warmup_teacher_temp",
        f"must be positive, got {k.warmup_teacher_temp}",
    )
    _check(k.student_temp > 0, "dino.student_temp", f"must be positive, got {k.student_temp}")
    _check(
        0 <= k.warmup_teacher_temp_epochs <= t.epochs,
        "dino.warmup_teacher_temp_epochs",
        f"must lie in [0, train.epochs={t.epochs}], got {k.warmup_teacher_temp_epochs}",
    )
    _check(
        k.teacher_temp_schedule in ("epoch", "step"),
        "dino.teacher_temp_schedule",
        f"must be 'epoch' or 'step', got {k.teacher_temp_schedule!r}",
    )
    _check(0 <= k.center_momentum < 1, "dino.center_momentum", f"must lie in [0, 1), got {k.center_momentum}")

    _check(t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}")
    _check(
        t.precision in PRECISIONS, "train.precision", f"{t.precision!r} is not one of {', '.join(PRECISIONS)}"
    )
    _check(t.device in DEVICES, "train.device", f"{t.device!r} is not one of {', '.join(DEVICES)}")
    _check(t.output_dir != "", "train.output_dir", "is required")
    for name in ("num_threads", "saveckp_freq", "checkpoint_every_steps", "max_steps"):
        _check(getattr(t, name) >= 0, f"train.{name}", f"must be 0 or more, got {getattr(t, name)}")
    _check(
        t.accumulation_steps >= 1,
        "train.accumulation_steps",
        f"must be at least 1, got {t.accumulation_steps}",
    )
    _check(
        d.batch_size_per_gpu % t.accumulation_steps == 0,
        "train.accumulation_steps",
        f"{t.accumulation_steps} does not divide data.batch_size_per_gpu={d.batch_size_per_gpu}",
    )
    # Not on/off: YAML reads those as booleans.
    _check(
        t.fused_attention in ("auto", "fused", "explicit"),
        "train.fused_attention",
        f"must be auto, fused or explicit, got {t.fused_attention!r}",
    )
    _check(t.keep_last >= 1, "train.keep_last", f"must be at least 1, got {t.keep_last}")
    _check(t.log_every_steps >= 1, "train.log_every_steps", f"must be at least 1, got {t.log_every_steps}")
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be at least 1")
    mon = cfg.monitor
    _check(mon.knn_every_epochs >= 1, "monitor.knn_every_epochs", "must be at least 1")
    _check(all(k >= 1 for k in mon.knn_ks), "monitor.knn_ks", f"every k must be at least 1, got {mon.knn_ks}")
    _check(mon.knn_temperature > 0, "monitor.knn_temperature", "must be positive")
    _check(mon.knn_resize >= 0 and mon.knn_crop >= 0, "monitor.knn_resize", "sizes must be 0 or positive")
    _check(mon.knn_batch_size >= 1, "monitor.knn_batch_size", "must be at least 1")
    _check(mon.attention_every_epochs >= 1, "monitor.attention_every_epochs", "must be at least 1")
    _check(t.dist_timeout_s > 0, "train.dist_timeout_s", f"must be positive, got {t.dist_timeout_s}")


def scaled_lr(lr: float, batch_size_per_gpu: int, world_size: int) -> float:
    """The linear scaling rule of the paper: lr is given for a total batch of 256."""
    return lr * batch_size_per_gpu * world_size / 256.0
