"""The demo's promise: a short DINO run on the embedded data set gives a teacher whose k-NN accuracy on the
held-out split beats a randomly initialised backbone of the same shape."""

import torch

from dino_train.config import load_config
from dino_train.data import generate_embedded_dataset
from dino_train.models import build_backbone
from dino_train.train import train
from eval.knn_eval import evaluate_knn
from tests.conftest import REPO


def test_one_epoch_of_dino_beats_random_init(tmp_path):
    root = generate_embedded_dataset(tmp_path / "embedded")  # the demo's data, default size
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.path={root / 'train'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.epochs=1",
            "optim.warmup_epochs=0",
            "train.num_threads=2",
            "train.progress_bar=false",
            "data.num_workers=0",
        ],
    )
    result = train(cfg)
    kw = dict(ks=(10,), resize=64, crop=64, batch_size=128, device="cpu")
    trained = evaluate_knn(result.teacher.backbone.float(), root / "train", root / "val", **kw)
    torch.manual_seed(cfg.train.seed + 1)
    random = evaluate_knn(build_backbone("vit_tiny", 8, 64), root / "train", root / "val", **kw)
    assert trained[10][0] > random[10][0] + 2.0, (trained, random)
