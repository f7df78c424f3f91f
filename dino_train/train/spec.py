"""The backbone record a run writes into its checkpoints and exports: what builds the backbone and, for
multi-band runs, the per-band statistics its inputs were normalised by."""

from __future__ import annotations

from functools import lru_cache

from dino_train.config import Config, ConfigError, position_grid_size, uses_bands
from dino_train.data.bands import BandStats, load_band_stats
from dino_train.data.datasets import DataError
from dino_train.models.backbone import BackboneSpec
from dino_train.models.wrapper import model_spec


@lru_cache(maxsize=8)
def _stats(path: str, channels: int) -> BandStats:
    return load_band_stats(path, channels)


def run_band_stats(cfg: Config) -> BandStats | None:
    """``data.band_stats`` read once per process (every checkpoint records the values the run started
    with); None for RGB runs. A file that is missing or does not fit is a ConfigError naming it."""
    if not uses_bands(cfg):
        return None
    try:
        return _stats(cfg.data.band_stats, cfg.data.channels)
    except DataError as err:
        raise ConfigError(f"data.band_stats: {err}") from err


def run_spec(cfg: Config) -> BackboneSpec:
    """``model_spec`` of the run's model section, position grid, bands and band statistics."""
    return model_spec(cfg.model, position_grid_size(cfg), cfg.data.channels, run_band_stats(cfg))
