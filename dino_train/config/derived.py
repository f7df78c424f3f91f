"""What the config implies: the checks that involve several fields, and the values derived from it
(scaled lr, total steps, the position grid's size, the k-NN monitor's sizes), each derived once here."""

from __future__ import annotations

from dataclasses import dataclass

from dino_train.config.fields import ConfigError, check_fields
from dino_train.config.schema import Config
from dino_train.data.transforms import resize_for
from dino_train.models.backbone import RELEASE_ARCHS, is_known_arch, is_vit_name


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Reject impossible values before any compute: each field's own rules, then those between fields.
    Checks that need the hardware (fp16 on a CPU) are in ``dino_train.runtime.precision``."""
    check_fields(cfg)
    m, d, t = cfg.model, cfg.data, cfg.train
    _check(
        is_known_arch(m.arch),
        "model.arch",
        f"{m.arch!r} is neither {', '.join(RELEASE_ARCHS)} nor a timm model",
    )
    _check(
        cfg.optim.warmup_epochs <= t.epochs,
        "optim.warmup_epochs",
        f"{cfg.optim.warmup_epochs} warmup epochs is more than train.epochs={t.epochs}",
    )
    _check(
        cfg.dino.warmup_teacher_temp_epochs <= t.epochs,
        "dino.warmup_teacher_temp_epochs",
        f"must lie in [0, train.epochs={t.epochs}], got {cfg.dino.warmup_teacher_temp_epochs}",
    )
    _check(
        d.batch_size_per_gpu % t.accumulation_steps == 0,
        "train.accumulation_steps",
        f"{t.accumulation_steps} does not divide data.batch_size_per_gpu={d.batch_size_per_gpu}",
    )
    if cfg.ibot.loss_weight and cfg.train.accumulation_steps > 1:
        raise ConfigError("ibot.loss_weight: iBOT is not supported with train.accumulation_steps > 1 yet")
    if m.arch not in RELEASE_ARCHS and not is_vit_name(m.arch):  # a CNN: no tokens to add or mask
        tokens = (("model.num_registers", m.num_registers), ("ibot.loss_weight", cfg.ibot.loss_weight),
                  ("gram.weight", cfg.gram.weight))  # fmt: skip
        for key, on in tokens:
            _check(not on, key, f"needs a ViT's patch tokens; {m.arch} has none (set it to 0)")
    if uses_bands(cfg):
        stats_hint = f"dino-data-stats {d.path or 'DATA'} --channels {d.channels} --out FILE"
        _check(
            bool(d.band_stats),
            "data.band_stats",
            f"data.channels={d.channels} needs per-band statistics: {stats_hint}, then data.band_stats=FILE",
        )
        _check(d.format == "folder", "data.format", "multi-band images are read from folders, not shards")
        _check(
            d.augment_device in ("auto", "cpu"),
            "data.augment_device",
            f"multi-band augmentation runs in the loader (auto or cpu), not {d.augment_device}",
        )
        _check("in_chans" not in m.timm_kwargs, "model.timm_kwargs", "in_chans comes from data.channels")
    if m.arch in RELEASE_ARCHS:  # a timm model's patch size is known once it is built (models.backbone)
        for key, size in (
            ("model.img_size", position_grid_size(cfg)),
            ("data.global_crops_size", d.global_crops_size),
            ("data.local_crops_size", d.local_crops_size),
        ):
            _check(
                size % m.patch_size == 0, key, f"{size} is not a multiple of model.patch_size={m.patch_size}"
            )


def uses_bands(cfg: Config) -> bool:
    """Whether the run reads N-band files (data.channels, data.band_stats) instead of RGB images."""
    return cfg.data.channels != 3 or bool(cfg.data.band_stats)


def scaled_lr(lr: float, batch_size_per_gpu: int, world_size: int) -> float:
    """The linear scaling rule of the paper: lr is given for a total batch of 256."""
    return lr * batch_size_per_gpu * world_size / 256.0


@dataclass(frozen=True)
class RunPlan:
    """A run's numbers that follow from its config, the process count and the data set's size."""

    world_size: int
    steps_per_epoch: int
    total_batch: int  # images per optimizer step over all processes
    base_lr: float  # optim.lr scaled by total_batch / 256
    total_steps: int  # train.epochs * steps_per_epoch, capped by train.max_steps

    @property
    def images_per_epoch(self) -> int:
        return self.steps_per_epoch * self.total_batch


def plan_run(cfg: Config, world_size: int, steps_per_epoch: int) -> RunPlan:
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    batch = cfg.data.batch_size_per_gpu * world_size
    return RunPlan(world_size, steps_per_epoch, batch, scaled_lr(cfg.optim.lr, batch, 1), total)


RELEASE_GRID_PX = 224  # the release's ViTs: 14 x 14 positions at patch 16, 28 x 28 at patch 8


def position_grid_size(cfg: Config) -> int:
    """Pixels covered by the position-embedding grid: model.img_size, else the release's 224."""
    return cfg.model.img_size or RELEASE_GRID_PX


def knn_sizes(cfg: Config) -> tuple[int, int]:
    """(resize, crop) of the periodic k-NN: the crop defaults to the global crop size, the resize to the
    release's 256 / 224 of the crop."""
    crop = cfg.monitor.knn_crop or cfg.data.global_crops_size
    return cfg.monitor.knn_resize or resize_for(crop), crop
