"""A Python API for notebooks: pretrain, load a backbone, look at its attention, extract features and
score them with k-NN or a linear probe.

    import dino
    result = dino.pretrain("configs/demo.yaml", ["train.epochs=2"])
    model = dino.load_backbone(result.output_dir / "checkpoint.pth")
    dino.plot_attention(model, "image.png", threshold=0.6)
    dino.attention_jaccard(model, "data/embedded/val", "data/embedded/val_masks").best_head_per_object
    train, val = dino.extract_features(model, "data/train"), dino.extract_features(model, "data/val")
    dino.knn_accuracy(train.features, train.labels, val.features, val.labels, k=20)

Every function is a thin layer over the code the command-line tools run (``dino_train``, ``eval``), so
its numbers are theirs. See ``examples/dino_quickstart.ipynb``.
"""

from dino.attention import AttentionMaps, JaccardResult, attention_jaccard, attention_maps, plot_attention
from dino.classify import LinearProbe, knn_accuracy, knn_predict, linear_probe
from dino.features import Features, extract_features, load_features
from dino.models import best_device, load_backbone, pretrain
from dino_train.config import ConfigError
from dino_train.data import generate_embedded_dataset
from dino_train.runtime.files import CheckpointError
from dino_train.train import TrainResult

__all__ = [
    "AttentionMaps",
    "CheckpointError",
    "ConfigError",
    "Features",
    "JaccardResult",
    "LinearProbe",
    "TrainResult",
    "attention_jaccard",
    "attention_maps",
    "best_device",
    "extract_features",
    "generate_embedded_dataset",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "load_backbone",
    "load_features",
    "plot_attention",
    "pretrain",
]
