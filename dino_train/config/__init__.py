"""One config schema for training, shared by torchrun, Slurm, the notebook API and the demo.

Three layers, merged once: the schema defaults (``schema``: the original release's ``main_dino.py``
defaults) < a recipe yaml holding only what differs < ``section.key=value`` overrides (``merge``). Every
key and value is checked before any compute, and errors name the key at fault (``fields``, ``derived``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dino_train.config.derived import (
    RunPlan,
    knn_sizes,
    plan_run,
    position_grid_size,
    scaled_lr,
    uses_bands,
    validate,
)
from dino_train.config.fields import ConfigError
from dino_train.config.merge import merge_into, parse_override, plain, save_yaml
from dino_train.config.schema import (
    Config,
    DataConfig,
    DinoConfig,
    DistillConfig,
    GramConfig,
    IBOTConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    Precision,
    TrainConfig,
)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A checked Config from the schema defaults, an optional recipe yaml and key=value overrides."""
    cfg = merge_into(Config(), path, overrides)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a checked Config from ``to_dict`` output (as stored in checkpoints)."""
    cfg = Config()
    merge_into(cfg, None, [])
    from dino_train.config.merge import _apply  # the same typed merge as a recipe file's

    _apply(cfg, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (lists, not tuples), so it round-trips through YAML and torch.load(weights_only=True)."""
    return plain(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    save_yaml(cfg, path)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DinoConfig",
    "DistillConfig",
    "GramConfig",
    "IBOTConfig",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "Precision",
    "RunPlan",
    "TrainConfig",
    "config_from_dict",
    "knn_sizes",
    "load_config",
    "merge_into",
    "parse_override",
    "plan_run",
    "position_grid_size",
    "save_config",
    "scaled_lr",
    "to_dict",
    "uses_bands",
    "validate",
]
