"""Any timm backbone trains and evaluates: a ResNet and a ConvNeXt through main.py's and eval_knn's
main(), the release's ResNet-50 and XCiT key layouts in eval, and clear errors for what needs a ViT."""

import json

import pytest
import timm
import torch

from dino_train.main import main as train_main
from dino_train.models import NotAViTError, as_vit, build_backbone
from dino_train.models.loading import load_backbone
from dino_train.runtime.files import CheckpointError
from eval.knn.cli import main as knn_main
from tests.helpers import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "arch, sizes",
    [("resnet18", ["data.global_crops_size=32", "data.local_crops_size=16"]),
     ("convnext_atto", ["data.global_crops_size=64", "data.local_crops_size=32"])],
)  # fmt: skip
def test_timm_backbone_trains_and_scores_with_eval_knn(arch, sizes, tiny_data, tmp_path, one_thread):
    # main.py's and eval_knn's main() in this process (the scripts themselves run under torchrun in
    # tests/test_train_e2e.py and tests/test_eval_end_to_end.py).
    out = tmp_path / arch
    assert train_main(tiny_overrides(tiny_data, out, f"model.arch={arch}", "train.max_steps=3", *sizes)) == 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["backbone"]["timm_name"] == arch
    # The backbone-only file: its <file>.json sidecar names the backbone (a ConvNeXt's weights alone do not).
    assert json.loads((out / "teacher_backbone.pth.json").read_text())["backbone"]["timm_name"] == arch
    knn = knn_main(["--checkpoint", str(out / "teacher_backbone.pth"), "--data", str(tiny_data), "--ks", "1",
                    "3", "--resize", "32", "--crop", "32", "--num-workers", "0", "--output-dir",
                    str(tmp_path / "knn"), "--no-progress"])  # fmt: skip
    assert knn == 0
    result = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert result["backbone"]["arch"] == arch and 0 <= result["results"]["1"]["top1"] <= 100
    # The teacher scored is the trained one: the eval model's weights equal the checkpoint's teacher.
    for path in (out / "checkpoint.pth", out / "teacher_backbone.pth"):
        model, _ = load_backbone(path)
        for key, value in model.state_dict().items():
            assert torch.equal(value, ckpt["teacher"]["backbone." + key]), key
    (out / "teacher_backbone.pth.json").unlink()  # without it, only weights the loader can read are named
    if arch == "convnext_atto":
        with pytest.raises(CheckpointError, match="cannot tell which backbone"):
            load_backbone(out / "teacher_backbone.pth")


def test_release_resnet50_layout_loads_in_eval(tmp_path):
    """dino_resnet50_pretrain.pth is a torchvision ResNet-50 state dict without fc: timm's keys."""
    torch.manual_seed(0)
    src = timm.create_model("resnet50", num_classes=0).eval()
    torch.save(src.state_dict(), tmp_path / "dino_resnet50_pretrain.pth")
    model, info = load_backbone(tmp_path / "dino_resnet50_pretrain.pth")
    assert info["arch"] == "resnet50" and info["embed_dim"] == 2048
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_release_xcit_layout_loads_in_eval(tmp_path):
    """The release's XCiT files use the official names (pos_embeder, a fused class-attention qkv)."""
    torch.manual_seed(0)
    src = timm.create_model("xcit_nano_12_p16_224", num_classes=0).eval()
    sd = src.state_dict()
    official = {k.replace("pos_embed.", "pos_embeder."): v for k, v in sd.items() if ".attn.q." not in k and
                ".attn.k." not in k and ".attn.v." not in k}  # fmt: skip
    for i in range(len(src.cls_attn_blocks)):
        p = f"cls_attn_blocks.{i}.attn."
        official[p + "qkv.weight"] = torch.cat([sd[p + f"{n}.weight"] for n in "qkv"])
        official[p + "qkv.bias"] = torch.cat([sd[p + f"{n}.bias"] for n in "qkv"])
    torch.save({"teacher": {"backbone." + k: v for k, v in official.items()}}, tmp_path / "xcit.pth")
    model, info = load_backbone(tmp_path / "xcit.pth")
    assert info["arch"] == "xcit_nano_12_p16_224"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_vit_only_features_say_so_for_other_backbones():
    resnet = build_backbone("resnet18")
    with pytest.raises(NotAViTError, match="attention maps: ResNet is not a ViT"):
        as_vit(resnet, "attention maps")
    assert as_vit(build_backbone("vit_tiny", 16, 32), "x") is not None


def test_shallower_vit_through_timm_kwargs_round_trips_in_eval(tmp_path, tiny_data):
    from dino_train.config import load_config
    from dino_train.train import train

    out = tmp_path / "run"
    train(
        load_config(None, tiny_overrides(tiny_data, out, "model.timm_kwargs={depth: 2}", "train.max_steps=1"))
    )
    model, info = load_backbone(out / "checkpoint.pth")
    assert len(model.blocks) == 2 and info["timm_kwargs"]["depth"] == 2
    backbone_only, info2 = load_backbone(out / "teacher_backbone.pth")  # inferred from the weights alone
    assert len(backbone_only.blocks) == 2 and info2["arch"] == "vit_tiny"


def test_dinov2_register_vit_weights_are_read_from_their_shapes(tmp_path):
    """A dinov2-style ViT (4 registers, positions for patches only, layer scale) saved as a plain
    backbone file is rebuilt from its weights alone and gives the same features."""
    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, num_classes=0).eval()
    torch.save(src.state_dict(), tmp_path / "reg.pth")
    model, info = load_backbone(tmp_path / "reg.pth")
    assert info["timm_kwargs"]["reg_tokens"] == 4 and info["patch_size"] == 14
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
