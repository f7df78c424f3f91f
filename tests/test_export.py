"""dino-export round trips: transformers' ViTModel, onnxruntime and timm load what it writes and give the
backbone's own features. (That a demo checkpoint loads strictly into the release's layout is
tests/test_release_parity.py's.)"""

import json

import pytest
import timm
import torch

from dino_train.models import build_backbone
from dino_train.models.loading import load_backbone
from eval.export import main as export_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "teacher_backbone.pth"
    model = build_backbone("vit_tiny", patch_size=16, img_size=64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the init: every weight must be carried over
    torch.save(model.state_dict(), path)
    return path


def _ours(path, x):
    model, _ = load_backbone(path)
    with torch.no_grad():
        return model.forward_features(x)


def test_hf_export_loads_in_transformers_with_the_same_outputs(vit_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert export_main(["--checkpoint", str(vit_file), "--format", "hf", "--output", str(tmp_path)]) == 0
    hf = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = hf(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, _ours(vit_file, x), atol=1e-5, rtol=1e-5)  # CLS and patch tokens
    assert json.loads((tmp_path / "export.json").read_text())["format"] == "hf"


def test_onnx_export_has_a_dynamic_batch_and_matches_torch(vit_file, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert export_main(["--checkpoint", str(vit_file), "--format", "onnx", "--output", str(out),
                        "--image-size", "64"]) == 0  # fmt: skip
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    model, _ = load_backbone(vit_file)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)
    assert json.loads((out / "export.json").read_text())["onnxruntime_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("fmt", ["timm", "safetensors"])
def test_timm_and_safetensors_exports_load_in_timm(vit_file, tmp_path, fmt):
    assert export_main(["--checkpoint", str(vit_file), "--format", fmt, "--output", str(tmp_path)]) == 0
    kwargs = {"patch_size": 16, "img_size": 64}
    if fmt == "timm":
        cfg = json.loads((tmp_path / "timm_config.json").read_text())
        assert cfg["timm_name"] == "vit_tiny_patch16_224"
        kwargs = cfg["kwargs"]
    overlay = {"file": str(tmp_path / "model.safetensors")}
    name = "vit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), _ours(vit_file, x))


def test_an_export_killed_midway_never_leaves_a_mixed_set(vit_file, tmp_path):
    """kill -9 a re-export into the same folder the moment it has cleared the earlier export (ViT-S's
    90 MB then take a fraction of a second to serialise and write): no record describes the folder,
    none of the earlier export's files is left beside the new ones, nothing at a final name is
    half-written, and the same command run again writes what an uninterrupted export writes."""
    import subprocess
    import sys
    import time

    from tests.helpers import ENV

    torch.manual_seed(1)
    other = tmp_path / "small.pth"  # another model (ViT-S) than the first export's (ViT-Ti)
    torch.save(build_backbone("vit_small", patch_size=16, img_size=64).state_dict(), other)
    out, whole = tmp_path / "out", tmp_path / "whole"
    assert export_main(["--checkpoint", str(vit_file), "--format", "timm", "--output", str(out)]) == 0
    assert json.loads((out / "export.json").read_text())["source"] == str(vit_file)

    argv = ["--checkpoint", str(other), "--format", "timm", "--output"]
    proc = subprocess.Popen([sys.executable, "-m", "eval.export", *argv, str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while (out / "export.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.02)  # the earlier files go next (milliseconds); the new weights take ~0.2 s to serialise
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode not in (0, None), "the export finished before it could be killed"
    assert not (out / "export.json").exists()  # no record describes the folder any more

    def made_from(name: str) -> str | None:  # which export a file left in the folder belongs to
        if not (out / name).exists():
            return None
        if name == "timm_config.json":
            return json.loads((out / name).read_text())["timm_name"].split("_")[1]
        from safetensors.torch import load_file

        return {192: "tiny", 384: "small"}[load_file(out / name)["cls_token"].shape[-1]]

    left = {made_from(n) for n in ("model.safetensors", "timm_config.json")} - {None}
    assert len(left) <= 1, f"files of two exports side by side: {left}"

    assert export_main([*argv, str(out)]) == 0  # the same command again
    assert export_main([*argv, str(whole)]) == 0
    for name in ("model.safetensors", "timm_config.json"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert json.loads((out / "export.json").read_text())["source"] == str(other)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # nor any temporary file


def test_a_refused_export_leaves_the_earlier_one_in_place(vit_file, tmp_path):
    """--format hf refuses a ViT with registers; the folder's earlier export is not removed for nothing."""
    regs = tmp_path / "regs.pth"
    torch.save(
        build_backbone("vit_tiny", patch_size=16, img_size=64, timm_kwargs={"reg_tokens": 4}).state_dict(),
        regs,
    )
    out = tmp_path / "out"
    assert export_main(["--checkpoint", str(vit_file), "--format", "timm", "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(regs), "--format", "hf", "--output", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
