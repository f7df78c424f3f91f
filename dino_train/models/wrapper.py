"""Multi-crop forward: one backbone pass per crop resolution, then the head once over all crops."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from dino_train.models.backbone import BackboneSpec, as_vit, backbone_spec, build_from_spec, embed_dim
from dino_train.models.head import DINOHead

if TYPE_CHECKING:
    from dino_train.config import IBOTConfig, ModelConfig
    from dino_train.data.bands import BandStats


class CropOutputs(NamedTuple):
    logits: torch.Tensor  # (sum of batch sizes, out_dim): the head on each crop's CLS feature, crop order
    features: torch.Tensor  # (sum of batch sizes, embed_dim): the backbone's CLS features
    # (M, patch out_dim): the patch head on the M patch tokens of the first resolution (the global crops)
    # that ``forward``'s ``patches`` selects, in the order of ``tokens[patches]``; None without it.
    patch_logits: torch.Tensor | None
    # (sum of batch sizes, bottleneck_dim): the head's L2-normalised bottleneck, which the prototypes
    # score; None for a head without one.
    bottleneck: torch.Tensor | None = None
    # (B_first, N, embed_dim): the backbone's output patch tokens of the first resolution group (the
    # global crops), when ``forward`` was asked for them (``tokens``; Gram anchoring); None otherwise.
    patch_tokens: torch.Tensor | None = None


class MultiCropWrapper(nn.Module):
    """Holds ``backbone`` and ``head`` (weights named ``backbone.*`` and ``head.*`` as in the release) and,
    for iBOT, a learnable ``mask_token`` and optionally its own ``patch_head``."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        patch_head: nn.Module | None = None,
        mask_token: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        if patch_head is not None:
            self.patch_head = patch_head
        self._masks: torch.Tensor | None = None
        if mask_token:
            vit = as_vit(backbone, "iBOT's masked patches")
            self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))
            # A hook, not a replaced module: the backbone's weight names stay the release's.
            vit.patch_embed.register_forward_hook(self._mask_patches)

    def _mask_patches(self, _module: nn.Module, _args: tuple, x: torch.Tensor) -> torch.Tensor | None:
        """Patch embeddings (B, h, w, D) with the masked positions replaced by the mask token."""
        if self._masks is None:
            return None
        m = self._masks.view(*x.shape[:-1], 1)
        return torch.where(m, self.mask_token.to(x.dtype).view(1, 1, 1, -1), x)

    def forward(
        self,
        crops: list[torch.Tensor] | torch.Tensor,
        return_features: bool = False,
        masks: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        outputs: bool = False,
        tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CropOutputs:
        """crops: list of (B, 3, H_i, W_i); consecutive crops of one size share a backbone pass.

        Returns (sum of batch sizes, out_dim) head outputs in crop order, and with ``return_features``
        also the backbone's CLS features (sum of batch sizes, embed_dim). With ``outputs`` the whole
        ``CropOutputs`` of ``forward_crops`` (called through ``forward``, so that DDP sees the call).
        """
        out = self.forward_crops(crops, masks, patches, tokens)
        if outputs:
            return out
        return (out.logits, out.features) if return_features else out.logits

    def forward_crops(
        self,
        crops: list[torch.Tensor] | torch.Tensor,
        masks: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        tokens: bool = False,
    ) -> CropOutputs:
        """As ``forward``. For the first resolution group (the global crops) ``masks`` (B_first, N) bool
        replaces those patches by the mask token (the later groups are never masked), and ``patches``
        (B_first, N) bool selects the patch tokens the patch head runs on: iBOT's loss reads only the
        masked positions, so the student passes its masks as both and the teacher (unmasked input) as
        ``patches`` alone; the head, as large as a ViT-Tiny, then runs on ~15% of the tokens. ``tokens``
        keeps the first group's output patch tokens in the result."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats, patch_tokens, start = [], None, 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            x = torch.cat(crops[start:end])
            if start == 0 and (patches is not None or tokens):
                self._masks = masks
                try:
                    out = self.backbone.forward_features(x)
                finally:
                    self._masks = None
                feats.append(self.backbone.forward_head(out))
                patch_tokens = out[:, self.backbone.num_prefix_tokens :]
            else:
                feats.append(self.backbone(x))
            start = end
        features = torch.cat(feats)
        patch_logits = None
        if patches is not None and patch_tokens is not None:
            head = getattr(self, "patch_head", self.head)
            patch_logits = head(patch_tokens[patches.to(patch_tokens.device)])
        kept = patch_tokens if tokens else None
        if isinstance(self.head, DINOHead):
            z = self.head.project(features)
            return CropOutputs(self.head.last_layer(z), features, patch_logits, z, kept)
        return CropOutputs(self.head(features), features, patch_logits, None, kept)


def model_spec(
    m: ModelConfig, img_size: int, channels: int = 3, input_stats: BandStats | None = None
) -> BackboneSpec:
    """The backbone a model section describes, with the position grid covering ``img_size`` pixels, for
    images of ``channels`` bands normalised by ``input_stats`` (None: RGB with ImageNet's)."""
    kwargs = dict(m.timm_kwargs)
    if m.num_registers:
        kwargs["reg_tokens"] = m.num_registers
    if channels != 3:
        kwargs["in_chans"] = channels
    spec = backbone_spec(m.arch, m.patch_size, img_size, kwargs, m.pos_embed_interpolation)
    if input_stats is None:
        return spec
    return replace(spec, input_stats=input_stats.as_dict())


def build_student_teacher(
    m: ModelConfig, img_size: int, ibot: IBOTConfig | None = None, channels: int = 3
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop path) and teacher (without), the teacher initialised equal and frozen. With an
    ``ibot`` section whose loss is on, both get a mask token and, if asked, a separate patch head."""
    spec = model_spec(m, img_size, channels)
    use_ibot = ibot is not None and ibot.loss_weight > 0

    def head(dim: int, out_dim: int) -> DINOHead:
        return DINOHead(
            dim,
            out_dim,
            use_bn=m.use_bn_in_head,
            norm_last_layer=m.norm_last_layer,
            nlayers=m.head_nlayers,
            hidden_dim=m.head_hidden_dim,
            bottleneck_dim=m.head_bottleneck_dim,
        )

    def make(dpr: float) -> MultiCropWrapper:
        backbone = build_from_spec(spec, dpr)
        dim = embed_dim(backbone)
        patch_head = head(dim, ibot.out_dim or m.out_dim) if use_ibot and ibot.separate_head else None
        return MultiCropWrapper(backbone, head(dim, m.out_dim), patch_head, mask_token=use_ibot)

    student = make(m.drop_path_rate)
    teacher = make(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher
