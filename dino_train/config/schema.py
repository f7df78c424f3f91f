"""The schema: every setting with its default (the original DINO release's ``main_dino.py`` defaults), its
type (``Literal`` for a closed set of values) and its checks, side by side. Checks between fields, and
the values derived from the config, are in ``dino_train.config.derived``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dino_train.config.fields import (
    at_least,
    crop_scale,
    each,
    in_range,
    positive,
    required,
    setting,
)
from dino_train.measure.settings import KNN_KS, KNN_TEMPERATURE

Precision = Literal["auto", "bf16", "fp16", "fp32"]


def _kwarg_names(kwargs: dict) -> str | None:
    bad = [k for k in kwargs if not k.isidentifier()]
    return (
        None if not bad else f"{bad} are not keyword names (YAML needs a space after the colon: {{depth: 6}})"
    )


@dataclass
class ModelConfig:
    # The release's vit_tiny / vit_small / vit_base (with patch_size), or any timm model name
    # (resnet50, convnext_tiny, xcit_small_12_p16_224, vit_small_patch14_reg4_dinov2, ...).
    arch: str = setting("vit_small", required)
    patch_size: int = setting(16, positive)  # the release's ViTs only; a timm name carries its own
    # Extra keyword arguments for timm.create_model (e.g. {depth: 6} for a shallower ViT); recorded in
    # checkpoints so evaluation builds the same model.
    timm_kwargs: dict[str, Any] = setting({}, _kwarg_names)
    # Register tokens (Darcet et al. 2023): extra learnable tokens that keep the attention maps clean.
    num_registers: int = setting(0, at_least(0))  # ViTs only
    # Position-embedding grid size in pixels; 0 means the release's 224 (14 x 14 at patch 16), whatever
    # the crop sizes, so that checkpoints load into the release's code.
    img_size: int = setting(0, at_least(0))
    # How a ViT resizes its position grid for other input sizes: "release" (bicubic, scale factor
    # (grid + 0.1) / old grid, no antialiasing: the release's and dinov2's rule) or "timm" (antialiased).
    pos_embed_interpolation: Literal["release", "timm"] = "release"
    drop_path_rate: float = setting(0.1, in_range(0, 1, hi_open=True))  # student only
    out_dim: int = setting(65536, positive)
    # Start student and teacher from existing weights (not a resume: the run starts at step 0): a release
    # backbone or full checkpoint, our checkpoint.pth or teacher_backbone.pth, a timm .pth/.safetensors.
    init_weights: str = ""
    init_head: bool = True  # also take the DINO head from the file when it has one that fits
    init_strict: bool = True  # every backbone weight must match; false loads what fits and reports it
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    head_nlayers: int = setting(3, at_least(1))
    head_hidden_dim: int = setting(2048, positive)
    head_bottleneck_dim: int = setting(256, positive)


@dataclass
class DataConfig:
    path: str = setting("", required)  # a class-folder data set (ImageFolder layout) or a folder of images
    # "folder": the images at data.path; "shards": webdataset tar shards (a folder of .tar files or a
    # brace pattern such as /data/in1k/shard-{000000..001281}.tar; dino-make-shards writes them),
    # streamed sequentially through a shuffle buffer of data.shuffle_buffer samples per loader worker.
    format: Literal["folder", "shards"] = "folder"
    shuffle_buffer: int = setting(1000, at_least(1))
    batch_size_per_gpu: int = setting(64, positive)
    num_workers: int = setting(10, at_least(0))
    global_crops_size: int = setting(224, positive)
    global_crops_scale: tuple[float, float] = setting((0.4, 1.0), crop_scale)
    local_crops_number: int = setting(8, at_least(0))
    local_crops_size: int = setting(96, positive)
    local_crops_scale: tuple[float, float] = setting((0.05, 0.4), crop_scale)
    # Solarisation's probability on global crop 1, global crop 2 and each local crop (the release's 0, 0.2,
    # 0), and its threshold in 8-bit levels (values at or above it are inverted, PIL's solarize): 0
    # inverts every pixel, a polarity inversion, for data whose classes do not depend on which region is
    # the brighter (docs/experiments.md, the long demo's variants); 256 inverts none.
    solarize_p: tuple[float, float, float] = setting((0.0, 0.2, 0.0), each(in_range(0, 1)))
    solarize_threshold: int = setting(128, in_range(0, 256))
    # Where multi-crop augmentation runs: "auto" is the batched uint8 tensor path, its photometric ops on
    # the GPU after the transfer when training on CUDA, in the loader workers otherwise; "cpu" / "cuda"
    # force either; "pil" is the release's PIL pipeline, kept for fidelity checks.
    augment_device: Literal["auto", "cpu", "cuda", "pil"] = "auto"
    # Images that are not RGB (docs/multiband.md): the number of bands per image, read from .npy, .npz,
    # multi-page TIFF or greyscale files, normalised by the per-band mean and std that dino-data-stats
    # computes from the data and writes to the file band_stats names (recorded in every checkpoint).
    # 3 bands without band_stats is RGB with ImageNet's statistics and colour augmentation.
    channels: int = setting(3, positive)
    band_stats: str = ""


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = setting(0.0005, positive)  # for a total batch of 256; scaled linearly with the real one
    min_lr: float = setting(1e-6, at_least(0))
    warmup_epochs: int = setting(10, at_least(0))
    weight_decay: float = setting(0.04, at_least(0))
    weight_decay_end: float = setting(0.4, at_least(0))
    clip_grad: float = setting(3.0, at_least(0))  # per-parameter gradient norm limit; 0 disables
    freeze_last_layer: int = setting(1, at_least(0))  # epochs during which the prototypes do not move


@dataclass
class DinoConfig:
    momentum_teacher: float = setting(0.996, in_range(0, 1))
    warmup_teacher_temp: float = setting(0.04, positive)
    teacher_temp: float = setting(0.04, positive)
    warmup_teacher_temp_epochs: int = setting(0, at_least(0))
    # "epoch" holds the teacher temperature per epoch as the release does; "step" interpolates per
    # iteration as dinov2 does.
    teacher_temp_schedule: Literal["epoch", "step"] = "epoch"
    student_temp: float = setting(0.1, positive)
    center_momentum: float = setting(0.9, in_range(0, 1, hi_open=True))
    # The teacher's targets: "center" subtracts the release's momentum center; "sinkhorn_knopp" balances
    # the batch over the prototypes with a few Sinkhorn-Knopp iterations instead (dinov2).
    centering: Literal["center", "sinkhorn_knopp"] = "center"
    sinkhorn_iterations: int = setting(3, at_least(1))
    # KoLeo regulariser on the student's CLS features of each global crop (dinov2 uses 0.1); 0 is off.
    koleo_weight: float = setting(0.0, at_least(0))
    # What KoLeo spreads: the backbone's CLS features (dinov2) or the head's L2-normalised bottleneck,
    # the vectors the prototypes score (keeps the head from mapping every image to one direction).
    koleo_on: Literal["backbone", "bottleneck"] = "backbone"


def _mask_ratio(r: tuple[float, float]) -> str | None:
    lo, hi = r
    return None if 0 <= lo <= hi < 1 else f"need 0 <= min <= max < 1, got {list(r)}"


@dataclass
class IBOTConfig:
    """iBOT's masked-patch loss (Zhou et al. 2022, as dinov2 uses it): the student sees its global crops
    with blocks of patches replaced by a mask token and predicts the teacher's patch outputs there."""

    loss_weight: float = setting(0.0, at_least(0))  # 0 is off
    mask_ratio: tuple[float, float] = setting((0.1, 0.5), _mask_ratio)  # share of patches masked
    mask_probability: float = setting(0.5, in_range(0, 1))  # share of global crops that get a mask
    separate_head: bool = False  # False: the DINO head also maps patch tokens (dinov2's default)
    out_dim: int = setting(0, at_least(0))  # prototypes of a separate head; 0: model.out_dim
    teacher_temp: float = setting(0.0, at_least(0))  # 0: the DINO teacher temperature schedule
    center_momentum: float = setting(0.9, in_range(0, 1, hi_open=True))


@dataclass
class GramConfig:
    """Gram anchoring (DINOv3, Simeoni et al. 2025): the student's L2-normalised patch features of the
    global crops keep the pairwise similarities (their Gram matrix) of a frozen earlier copy of the
    teacher's backbone, the Gram teacher, so that the dense features do not degrade late in a long run."""

    weight: float = setting(0.0, at_least(0))  # 0 is off; DINOv3's refinement stage uses 2
    start_step: int = setting(0, at_least(0))  # the first snapshot of the teacher, and the loss from there
    refresh_every: int = setting(0, at_least(0))  # steps between snapshots; 0 keeps the first (DINOv3: 10k)
    # The Gram teacher sees the global crops this many times larger and its patch features are resized
    # (bicubic) to the student's grid: DINOv3's high-resolution Gram teacher used 2.
    teacher_scale: float = setting(1.0, at_least(1))


@dataclass
class DistillConfig:
    """Distillation (DINOv3's, as dinov2's before it): a frozen, trained teacher of any size or family our
    tools load gives the targets of DINO's (and iBOT's) loss in place of the EMA teacher. The student's EMA
    is still kept: it is what checkpoints hold as ``teacher`` and what the eval tools score."""

    # A checkpoint whose teacher has its DINO head: ours (checkpoint.pth) or the release's full
    # checkpoint; or timm:NAME with ``weights`` such a file. A backbone without its head gets one first
    # by continued pretraining with the backbone frozen (docs/distillation.md); "" is off.
    teacher: str = ""
    weights: str = ""  # the local file of a timm:NAME teacher (nothing is downloaded)
    # Which network of a full checkpoint teaches.
    checkpoint_key: Literal["teacher", "student"] = "teacher"


@dataclass
class TrainConfig:
    epochs: int = setting(100, positive)
    # auto: bf16 (fp16 without) on CUDA; on the CPU bf16 if it measures faster, else fp32.
    precision: Precision = "auto"
    seed: int = setting(0, at_least(0))
    output_dir: str = setting("runs/dino", required)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = setting(0, at_least(0))  # torch intra-op threads per process; 0 keeps torch's
    saveckp_freq: int = setting(20, at_least(0))  # also keep checkpoint{epoch:04}.pth; 0 disables
    checkpoint_every_steps: int = setting(0, at_least(0))  # mid-epoch checkpoints; 0: epoch ends only
    keep_last: int = setting(3, at_least(1))  # rolling checkpoints kept for resume
    log_every_steps: int = setting(10, at_least(1))
    max_steps: int = setting(0, at_least(0))  # stop (with a checkpoint) after this many steps; 0: none
    # Continued pretraining from a backbone without its DINO head (model.init_weights): the backbone gets no
    # update for this many first epochs while the fresh head and prototypes learn (LightlyTrain's advice;
    # dinov2 #204: a released backbone unfrozen at once under a fresh head lost most of its k-NN).
    freeze_backbone_epochs: int = setting(0, at_least(0))
    # Memory levers: the batch as this many micro-batches (center and teacher updated once per step),
    # and activations recomputed per block in the backward pass instead of kept.
    accumulation_steps: int = setting(1, at_least(1))
    grad_checkpointing: bool = False
    # "ddp": every rank holds the whole student and teacher; "fsdp": torch's FSDP2 shards both (and the
    # optimizer state) over the ranks, for backbones that do not fit (ViT-L, ViT-g); its checkpoints are
    # sharded too, beside a release-layout checkpoint.pth (dino_train/train/sharded_checkpoint.py).
    sharding: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False  # torch.compile the backbones (the first steps are slow while it compiles)
    # scaled_dot_product_attention or the explicit softmax(q k^T): "auto" is fused on CUDA and explicit on
    # the CPU, where bench/train_step.py measured explicit faster in bf16. Not on/off: YAML reads those
    # as booleans.
    fused_attention: Literal["auto", "fused", "explicit"] = "auto"
    max_nonfinite_steps: int = setting(10, at_least(1))  # consecutive skipped steps before the run stops
    # How long a rank waits in a collective for a dead or hung peer before the run stops with an error.
    dist_timeout_s: float = setting(1800.0, positive)
    resume: bool = True
    progress_bar: bool | Literal["auto"] = "auto"  # a bar on a terminal; plain lines elsewhere


@dataclass
class MonitorConfig:
    # Periodic k-NN on a labelled folder with train/ and val/ class folders; "" disables it.
    knn_data: str = ""
    knn_every_epochs: int = setting(1, at_least(1))
    knn_ks: tuple[int, ...] = setting(KNN_KS, each(at_least(1)))
    knn_temperature: float = setting(KNN_TEMPERATURE, positive)
    knn_resize: int = setting(0, at_least(0))  # 0: knn_crop * 256 / 224, as the release's 256 / 224
    knn_crop: int = setting(0, at_least(0))  # 0: data.global_crops_size
    knn_batch_size: int = setting(128, at_least(1))
    # Attention maps of the images in this folder (a few) logged to TensorBoard; "" disables it.
    attention_images: str = ""
    attention_every_epochs: int = setting(1, at_least(1))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
