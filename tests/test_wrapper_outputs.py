"""What the multi-crop wrapper hands the objective: the head's bottleneck (KoLeo's ``bottleneck`` option
spreads it) and iBOT's patch outputs at the selected positions only, equal to the head on every token
then indexed."""

import torch

from dino_train.config import load_config
from dino_train.models.wrapper import build_student_teacher

OVERRIDES = ["data.path=unused", "model.arch=vit_tiny", "model.timm_kwargs={depth: 2}", "model.out_dim=64",
             "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "ibot.loss_weight=1.0"]  # fmt: skip


def models():
    torch.manual_seed(0)
    cfg = load_config(None, OVERRIDES)
    student, teacher = build_student_teacher(cfg.model, 32, cfg.ibot)
    return student.eval(), teacher.eval()


def test_bottleneck_is_what_the_prototypes_score():
    student, _ = models()
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    out = student(crops, outputs=True)
    assert out.bottleneck.shape == (9, 16)
    torch.testing.assert_close(out.bottleneck.norm(dim=-1), torch.ones(9))
    torch.testing.assert_close(out.logits, student.head.last_layer(out.bottleneck))
    torch.testing.assert_close(out.logits, student.head(out.features))


def test_patch_outputs_are_the_head_on_the_selected_tokens():
    student, teacher = models()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    masks = torch.zeros(4, 4, dtype=torch.bool)  # 2 crops x 2 images, 2 x 2 patches of 16 px
    masks[0, 1] = masks[2, 0] = masks[2, 3] = True
    t = teacher(crops, patches=masks, outputs=True)
    tokens = teacher.backbone.forward_features(torch.cat(crops))[:, teacher.backbone.num_prefix_tokens :]
    torch.testing.assert_close(t.patch_logits, teacher.head(tokens.reshape(-1, tokens.shape[-1])).view(
        4, 4, -1)[masks])  # fmt: skip
    s = student(crops, masks=masks, patches=masks, outputs=True)
    assert s.patch_logits.shape == (3, 64)
    # The student's masked tokens are the mask token, not the image: its outputs there differ.
    assert not torch.allclose(s.patch_logits, t.patch_logits)
    unmasked = student(crops, patches=masks, outputs=True)
    torch.testing.assert_close(unmasked.patch_logits, t.patch_logits)  # teacher = student at init
