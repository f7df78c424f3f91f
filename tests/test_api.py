"""The notebook API (``dino``) on tiny ViTs and the tiny embedded data set: it returns the shapes and types it
documents, and the same numbers as the code the command-line tools run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from matplotlib.figure import Figure
from PIL import Image

import dino
from dino.models import _override_texts, resolve_config_path
from dino_train.config import load_config
from dino_train.data import eval_transform
from dino_train.measure.attention import prepare_image, summarize
from dino_train.measure.knn import knn_classify
from dino_train.models import build_backbone
from eval.linear import cli as linear_eval
from tests.helpers import REPO, tiny_overrides

HEADS, DIM = 3, 192  # vit_tiny


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(backbone_file):
    return dino.load_backbone(backbone_file, device="cpu")


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------- loading


def test_load_backbone_is_ready_for_inference(backbone_file):
    model = dino.load_backbone(backbone_file)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).device.type == dino.best_device().type
    assert model.load_info["arch"] == "vit_tiny" and model.load_info["patch_size"] == 8
    reference = build_backbone("vit_tiny", 8, 32)
    reference.load_state_dict(torch.load(backbone_file, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.cpu()(x), reference.eval()(x))


def test_load_backbone_reads_a_training_checkpoint_and_picks_teacher_or_student(tmp_path):
    torch.manual_seed(1)
    teacher, student = build_backbone("vit_tiny", 8, 32), build_backbone("vit_tiny", 8, 32)
    head = {"head.last_layer.weight": torch.zeros(4, 16)}
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "epoch": 3,
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    loaded = dino.load_backbone(tmp_path / "checkpoint.pth", device="cpu")
    assert loaded.load_info["epoch"] == 3 and loaded.load_info["source"] == "training-checkpoint"
    torch.testing.assert_close(loaded.pos_embed, teacher.pos_embed)
    loaded = dino.load_backbone(tmp_path / "checkpoint.pth", checkpoint_key="student", device="cpu")
    torch.testing.assert_close(loaded.pos_embed, student.pos_embed)


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "vit_tiny_patch16_224"])
def test_load_backbone_timm_name_with_weights(tmp_path, name):
    torch.manual_seed(2)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(ref.state_dict(), tmp_path / "weights.pth")
    model = dino.load_backbone(name, weights=tmp_path / "weights.pth", device="cpu")
    assert model.load_info["source"] == "timm" and not model.training
    torch.testing.assert_close(model.cls_token, ref.cls_token)
    with pytest.raises(ValueError, match="is a file"):
        dino.load_backbone(tmp_path / "weights.pth", weights=tmp_path / "weights.pth")
    with pytest.raises(dino.CheckpointError, match="needs a local weights file"):
        dino.load_backbone("timm:vit_tiny_patch16_224")


# ----------------------------------------------------------------------------------------- attention


def test_attention_maps_match_dino_train_attention(model, tmp_path):
    path = _image(tmp_path / "img.png", 37, 53)  # cropped to 32 x 48: a 4 x 6 patch grid
    maps = dino.attention_maps(model, path, threshold=0.6)
    x = prepare_image(Image.open(path), None, 8)
    ref = summarize(model, x, 0.6)
    assert maps.heads.shape == (HEADS, 4, 6) and maps.heads.dtype == np.float32
    assert maps.mean.shape == (4, 6) and maps.image.shape == (32, 48, 3) and maps.image.dtype == np.uint8
    np.testing.assert_array_equal(maps.mean, ref.mean[0, 0].numpy())
    np.testing.assert_array_equal(maps.heads, ref.heads[0].numpy())
    np.testing.assert_array_equal(maps.masks, ref.head_masks[0].numpy())
    np.testing.assert_array_equal(maps.mean_mask, ref.mean_mask[0, 0].numpy())
    assert maps.masks.dtype == np.bool_ and maps.mean_mask.any()
    # The prepared image is the input cropped to whole patches (normalising and back rounds to +-1).
    original = np.asarray(Image.open(path))[:32, :48].astype(int)
    assert np.abs(maps.image.astype(int) - original).max() <= 1
    assert maps.upsampled(maps.mean).shape == (32, 48)


def test_attention_maps_take_pil_images_tensors_sizes_and_blocks(model, tmp_path):
    path = _image(tmp_path / "img.png", 32, 32, seed=1)
    by_path = dino.attention_maps(model, path)
    assert by_path.masks is None and by_path.mean_mask is None and by_path.threshold is None
    x = prepare_image(Image.open(path), None, 8)
    for same in (Image.open(path), x, x[0]):
        np.testing.assert_array_equal(dino.attention_maps(model, same).mean, by_path.mean)
    assert dino.attention_maps(model, path, image_size=64).heads.shape == (HEADS, 8, 8)
    first = dino.attention_maps(model, path, block=0)
    np.testing.assert_array_equal(first.mean, summarize(model, x, block=0).mean[0, 0].numpy())
    assert not np.array_equal(first.mean, by_path.mean)
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(1, 3, H, W\)"):
        dino.attention_maps(model, torch.zeros(2, 3, 32, 32))


def test_plot_attention_draws_two_rows_per_image(model, tmp_path):
    one = _image(tmp_path / "a.png", 32, 32)
    fig = dino.plot_attention(model, one)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * (2 + HEADS)
    fig = dino.plot_attention(model, [one, Image.open(_image(tmp_path / "b.png", 40, 24))], threshold=0.5)
    assert len(fig.axes) == 4 * (2 + HEADS)


def test_attention_jaccard_is_eval_attentions_measure(model, tiny_data, tmp_path):
    from dino_train.measure.jaccard import folder_jaccard

    images, masks = tiny_data / "val", tiny_data / "val_masks"
    got = dino.attention_jaccard(model, images, masks, image_size=48)
    want = folder_jaccard(model, images, masks, image_size=48)
    assert got.as_dict() == want.as_dict() and got.images == len(list(masks.rglob("*.png")))
    assert got.per_image == want.per_image and len(got.per_image) == got.images
    assert set(got.references) == {"masks_mean", "even_on_object"}
    with pytest.raises(ValueError, match="masks_dir .*nowhere is not a folder"):
        dino.attention_jaccard(model, str(images), tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ features


def test_extract_features_of_a_class_folder(model, tiny_data):
    got = dino.extract_features(model, tiny_data / "train", batch_size=16, image_size=32, progress=False)
    assert got.features.shape == (40, DIM) and got.features.dtype == torch.float32
    assert got.labels.dtype == torch.int64 and got.labels.tolist() == sorted(got.labels.tolist())
    assert len(got.classes) == 10 and len(got.paths) == 40 and got.patch_tokens is None
    tf = eval_transform(resize=round(32 * 256 / 224), crop=32)
    i = 7
    x = tf(Image.open(got.paths[i]).convert("RGB"))[None]
    with torch.no_grad():
        torch.testing.assert_close(got.features[i : i + 1], model(x))
    assert got.classes[got.labels[i]] == got.paths[i].parent.name


def test_extract_features_of_lists_flat_folders_and_tensors(model, tiny_data, tmp_path):
    files = sorted((tiny_data / "val" / "star").glob("*.png"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in files:
        (flat / f.name).write_bytes(f.read_bytes())
    kw = {"image_size": 32, "resize": 32, "progress": False}
    by_paths = dino.extract_features(model, files, **kw)
    assert by_paths.labels is None and by_paths.classes == [] and by_paths.paths == files
    by_folder = dino.extract_features(model, flat, **kw)
    assert by_folder.labels is None
    torch.testing.assert_close(by_folder.features, by_paths.features)
    by_pil = dino.extract_features(model, [Image.open(f) for f in files], batch_size=1, **kw)
    assert by_pil.paths is None
    torch.testing.assert_close(by_pil.features, by_paths.features)
    batch = torch.stack([eval_transform(32, 32)(Image.open(f).convert("RGB")) for f in files])
    by_tensor = dino.extract_features(model, batch, progress=False)
    torch.testing.assert_close(by_tensor.features, by_paths.features)


def test_extract_features_with_patch_tokens(model, tiny_data):
    kw = {"image_size": 32, "progress": False}
    plain = dino.extract_features(model, tiny_data / "val", **kw)
    both = dino.extract_features(model, tiny_data / "val", patch_tokens=True, **kw)
    assert both.patch_tokens.shape == (20, 16, DIM)  # 32 px / 8 px patches: a 4 x 4 grid
    torch.testing.assert_close(both.features, plain.features)
    x = eval_transform(round(32 * 256 / 224), 32)(Image.open(both.paths[0]).convert("RGB"))[None]
    with torch.no_grad():
        torch.testing.assert_close(both.patch_tokens[:1], model.forward_features(x)[:, 1:])


# -------------------------------------------------------------------------------------- classifiers


def _clusters(n_per_class: int, seed: int = 0, noise: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (4 * n_per_class, 16) around 4 fixed class centres, and their labels; ``seed`` draws the
    noise, so train and test splits share the centres."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(4).repeat_interleave(n_per_class)
    noise_draw = torch.randn(len(labels), 16, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + noise * noise_draw, labels


def test_knn_predict_and_accuracy_agree_with_knn_classify():
    train_x, train_y = _clusters(30, noise=1.2)
    test_x, test_y = _clusters(10, seed=1, noise=1.2)
    pred, scores = dino.knn_predict(train_x, train_y, test_x, k=20)
    assert pred.shape == (40,) and pred.dtype == torch.int64 and scores.shape == (40, 4)
    acc = dino.knn_accuracy(train_x, train_y, test_x, test_y, k=20)
    ref = knn_classify(train_x, train_y, test_x, test_y, 4, ks=(20,))[20][0]
    assert acc == ref == pytest.approx(100.0 * (pred == test_y).float().mean().item())
    assert 40.0 < acc < 100.0  # the noise makes some mistakes: a check that can fail either way
    # k=1: the label of the most cosine-similar training feature.
    nearest = torch.nn.functional.normalize(test_x, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    assert torch.equal(dino.knn_predict(train_x, train_y, test_x, k=1)[0], train_y[nearest.argmax(1)])
    np_acc = dino.knn_accuracy(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), k=20)
    assert np_acc == acc
    with pytest.raises(ValueError, match="negative labels"):
        dino.knn_predict(train_x, torch.full_like(train_y, -1), test_x)


def test_knn_accuracy_on_image_features_matches_knn_classify(model, tiny_data):
    tr = dino.extract_features(model, tiny_data / "train", image_size=32, progress=False)
    va = dino.extract_features(model, tiny_data / "val", image_size=32, progress=False)
    ref = knn_classify(tr.features, tr.labels, va.features, va.labels, 10, ks=(5,))[5][0]
    assert dino.knn_accuracy(tr.features, tr.labels, va.features, va.labels, k=5) == ref
    pred, _ = dino.knn_predict(tr.features, tr.labels, va.features, k=5)
    assert 100.0 * (pred == va.labels).float().mean().item() == pytest.approx(ref)


def test_linear_probe_learns_separable_features_and_leaves_the_rng_alone():
    train_x, train_y = _clusters(40)
    test_x, test_y = _clusters(10, seed=1)
    rng = torch.get_rng_state()
    probe = dino.linear_probe(train_x, train_y, test_x, test_y, epochs=20, lr=1.0, batch_size=32)
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(probe.classifier, torch.nn.Linear) and probe.classifier.weight.shape == (4, 16)
    assert probe.accuracy >= 90.0 and len(probe.history) == 20 and probe.history[-1]["epoch"] == 19
    assert probe.accuracy == pytest.approx(100.0 * (probe.predict(test_x) == test_y).float().mean().item())
    untrained = dino.linear_probe(train_x, train_y, test_x, test_y, epochs=1, lr=1e-6, batch_size=32)
    assert untrained.accuracy < probe.accuracy


def test_linear_probe_is_eval_linear_cached_features(model, backbone_file, tiny_data, tmp_path):
    run = ["--epochs", "3", "--lr", "0.5", "--batch-size", "8", "--n-last-blocks", "1", "--avgpool", "no"]
    common = ["--resize", "32", "--crop", "32", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    args = ["--checkpoint", str(backbone_file), "--data", str(tiny_data), "--output-dir", str(tmp_path)]
    assert linear_eval.main([*args, *run, *common, "--cached-features"]) == 0
    cli = torch.load(tmp_path / "linear_classifiers.pth", weights_only=True)["last"]
    last = json.loads((tmp_path / "linear_results.json").read_text())["probes"][0]["last"]

    kw = {"image_size": 32, "resize": 32, "progress": False}
    tr = dino.extract_features(model, tiny_data / "train", **kw)
    va = dino.extract_features(model, tiny_data / "val", **kw)
    probe = dino.linear_probe(tr.features, tr.labels, va.features, va.labels, epochs=3, lr=0.5, batch_size=8)
    torch.testing.assert_close(probe.classifier.weight, cli["heads.0.weight"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probe.classifier.bias, cli["heads.0.bias"], atol=1e-5, rtol=1e-4)
    assert (probe.accuracy, probe.top5) == (last["top1"], last["top5"])


# ---------------------------------------------------------------------------------------- pretrain


@pytest.mark.slow
def test_pretrain_returns_the_run_and_its_checkpoint_loads(tiny_data, tmp_path):
    result = dino.pretrain(None, tiny_overrides(tiny_data, tmp_path / "run", "train.max_steps=2"))
    assert isinstance(result, dino.TrainResult) and result.step == 2
    model = dino.load_backbone(result.output_dir / "checkpoint.pth", device="cpu")
    assert model.load_info["source"] == "training-checkpoint"
    torch.testing.assert_close(
        model.state_dict(), {k: v.cpu() for k, v in result.teacher.backbone.state_dict().items()}
    )


def test_pretrain_overrides_as_a_mapping_and_config_lookup(tmp_path, monkeypatch):
    texts = _override_texts(
        {
            "train.epochs": 3,
            "data.global_crops_scale": [0.3, 1.0],
            "model.norm_last_layer": False,
            "train.output_dir": "runs/x",
        }
    )
    cfg = load_config(REPO / "configs" / "demo.yaml", texts)
    assert cfg.train.epochs == 3 and cfg.data.global_crops_scale == (0.3, 1.0)
    assert cfg.model.norm_last_layer is False and cfg.train.output_dir == "runs/x"
    with pytest.raises(TypeError, match="list of"):
        _override_texts("train.epochs=3")
    monkeypatch.chdir(tmp_path)  # e.g. a notebook's own folder: configs/ is found under the repo root
    assert resolve_config_path("configs/demo.yaml") == REPO / "configs" / "demo.yaml"
    with pytest.raises(dino.ConfigError, match="train.nope"):
        dino.pretrain("configs/demo.yaml", ["train.nope=1"])
