"""Non-finite weights: loading a backbone with NaN or inf weights warns, and the features it gives are
refused, so no accuracy is reported on them."""

import warnings
from pathlib import Path

import pytest
import torch

from dino_train.models import build_backbone
from dino_train.models.loading import load_backbone
from dino_train.train.checkpoint import export_backbone


def nan_backbone(path: Path) -> Path:
    """A ViT-Tiny/8 (32 px) backbone file with 3 NaN and 2 inf weights in its final norm."""
    model = build_backbone("vit_tiny", 8, 32)
    with torch.no_grad():
        model.norm.weight[:3] = float("nan")
        model.norm.bias[:2] = float("inf")
    return export_backbone(model, path)


def test_non_finite_weights_warn_and_their_features_are_refused(tmp_path, tiny_data, capsys, one_thread):
    from dino_train.data import ImageDataset, eval_transform
    from dino_train.measure.features import NonFiniteFeaturesError, extract_features

    path = nan_backbone(tmp_path / "teacher_backbone.pth")
    with pytest.warns(UserWarning, match=rf"{path}: 5 of \d+ weights are not finite .* in 2 tensors \(norm"):
        model, info = load_backbone(path)
    assert info["nonfinite_weights"] == 5
    val = ImageDataset(tiny_data / "val", eval_transform(32, 32))
    with pytest.raises(
        NonFiniteFeaturesError, match=rf"backbone from {path} gives NaN or inf features for 20 of 20"
    ):
        extract_features(model, val, 8, 0, "cpu", progress=False)
    clean = export_backbone(build_backbone("vit_tiny", 8, 32), tmp_path / "clean.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file loads without a warning
        model, info = load_backbone(clean)
    assert info["nonfinite_weights"] == 0
    assert torch.isfinite(extract_features(model, val, 8, 0, "cpu", progress=False)[0]).all()


@pytest.mark.slow
def test_eval_knn_reports_no_accuracy_on_nan_features(tmp_path, tiny_data, capsys, one_thread):
    from eval.common import EvalExit
    from eval.knn import cli as knn_eval

    path = nan_backbone(tmp_path / "teacher_backbone.pth")
    with pytest.warns(UserWarning, match="5 of"), pytest.raises(EvalExit) as stop:
        knn_eval.main(
            ["--checkpoint", str(path), "--data", str(tiny_data), "--crop", "32", "--resize", "32"]
            + ["--num-workers", "0", "--device", "cpu", "--output-dir", str(tmp_path / "knn")]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert f"error: the backbone from {path} gives NaN or inf features for 40 of 40 images" in err, err
    assert not (tmp_path / "knn" / "knn_results.json").exists()
