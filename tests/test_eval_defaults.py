"""The same defaults through every door: eval_knn, the notebook API (``dino``) and training's k-NN monitor
give the same features and k-NN for the same checkpoint, folder and image size; every tool's --help shows
its defaults; result files record what produced them; one epoch numbering; short reprs."""

from __future__ import annotations

import json
import os

import pytest
import torch

import dino
from dino_train.config import knn_sizes, load_config
from dino_train.data.transforms import resize_for
from dino_train.measure.settings import KNN_KS
from dino_train.monitor.periodic import PeriodicKNN
from dino_train.monitor.report import epoch_label
from dino_train.runtime import cli
from eval.common import backbone_record, eval_sizes
from eval.knn import cli as knn_eval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_cli_api_and_training_monitor_agree_on_features_and_knn(tiny_data, backbone_file, tmp_path):
    # No --resize anywhere: each door applies its default, the release's crop * 256 / 224 (37 px for 32).
    args = ["--checkpoint", str(backbone_file), "--data", str(tiny_data), "--crop", "32", "--ks", "1", "5",
            "--num-workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    out, feats = tmp_path / "knn", tmp_path / "feats"
    assert knn_eval.main([*args, "--output-dir", str(out), "--dump-features", str(feats)]) == 0
    cli_res = json.loads((out / "knn_results.json").read_text())
    bank = torch.load(feats / "knn_features.pth", weights_only=True)

    model = dino.load_backbone(backbone_file, device="cpu")
    train = dino.extract_features(model, tiny_data / "train", image_size=32, progress=False)
    val = dino.extract_features(model, tiny_data / "val", image_size=32, progress=False)
    torch.testing.assert_close(train.features, bank["train_feats"], rtol=0, atol=1e-6)
    torch.testing.assert_close(val.features, bank["val_feats"], rtol=0, atol=1e-6)
    for k in (1, 5):
        api = dino.knn_accuracy(train.features, train.labels, val.features, val.labels, k=k)
        assert api == pytest.approx(cli_res["results"][str(k)]["top1"])

    overrides = [f"data.path={tiny_data / 'train'}", "data.global_crops_size=32"]
    cfg = load_config(None, [*overrides, f"monitor.knn_data={tiny_data}", "monitor.knn_ks=[1, 5]"])
    assert knn_sizes(cfg) == (resize_for(32), 32) == (37, 32)
    monitor = PeriodicKNN(cfg, None, torch.device("cpu")).evaluate(model)
    assert {k: v[0] for k, v in monitor.items()} == {int(k): v["top1"] for k, v in cli_res["results"].items()}

    # The file says how it was made: the sizes actually used, T, ks, the checkpoint, device, processes.
    s = cli_res["settings"]
    assert (s["resize"], s["crop"], s["temperature"], s["ks"]) == (37, 32, 0.07, [1, 5])
    assert (s["checkpoint"], s["device"], s["world_size"]) == (str(backbone_file), "cpu", 1)
    assert cli_res["extraction"]["resize"] == 37 and cli_res["backbone"]["epochs_completed"] is None


def _help(parse) -> None:
    with pytest.raises(SystemExit) as stop:
        parse(["--help"])
    assert stop.value.code == 0


def test_every_tool_shows_its_defaults(capsys):
    from dino_train.monitor import report
    from eval import export
    from eval.attention import cli as attention_eval
    from eval.attention import visualize
    from eval.finetune import cli as finetune_eval
    from eval.linear import cli as linear_eval
    from launch import demo, slurm, slurm_eval

    expected = {
        knn_eval.build_parser().parse_args: [
            "--ks KS [KS ...] numbers of neighbours (default: [10, 20, 100, 200])",
            "(default: 0.07)",
            "(default: 224)",
        ],
        linear_eval.build_parser().parse_args: ["(default: [0.001, 0.01, 0.1, 1.0])", "(default: 100)"],
        finetune_eval.build_parser().parse_args: ["(default: 0.0005)", "(default: 0.75)", "(default: 100)"],
        attention_eval.build_parser().parse_args: ["(default 0.6)", "(default: auto)"],
        visualize.parse_args: ["(default: 480)", "(default: 0.6)"],
        export.main: ["(default 224)", "(default: teacher)"],
        demo.parse_args: ["(default: data/embedded)"],
        slurm.main: ["(default: 3)", "(default: 01:00:00)"],
        slurm_eval.main: ["(default: knn)", "(default: runs/eval_slurm)"],
        report.main: ["(default: <run_dir>/report.png)"],
    }
    workers = f"(default: {cli.default_workers()})"
    for parse, needles in expected.items():
        _help(parse)
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare words
        for needle in needles:
            assert needle in text, (parse, needle)
        assert "(default: None)" not in text and "(default: False)" not in text, parse
        if "--num-workers" in text:
            assert workers in text, parse
    assert KNN_KS == (10, 20, 100, 200)


def test_default_workers_fit_the_machine(monkeypatch):
    for cores, workers in ((1, 0), (2, 1), (3, 2), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert cli.default_workers() == workers


def test_one_epoch_numbering():
    # A checkpoint's `epoch` (ours and the release's) counts epochs completed; logs and result files name
    # the last one by its 0-based index, as the training log and checkpoint0009.pth do.
    info = {"arch": "vit_small", "epoch": 10, "missing_keys": [], "unexpected_keys": [], "ignored_keys": []}
    record = backbone_record(info)
    assert (record["epoch"], record["epochs_completed"]) == (9, 10) and not any(
        k.endswith("_keys") for k in record
    )
    assert epoch_label(record["epoch"]) == "epoch 9 (10 completed)"
    assert backbone_record({"epoch": None})["epoch"] is None


def test_eval_sizes_default_to_the_release_rule():
    parser = knn_eval.build_parser()
    assert eval_sizes(parser.parse_args(["--crop", "64"])) == (73, 64)
    assert eval_sizes(parser.parse_args(["--crop", "64", "--resize", "64"])) == (64, 64)
    assert eval_sizes(parser.parse_args([])) == (256, 224)


def test_linear_probe_repr_is_short():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    y = (x[:, 0] > 0).long()
    probe = dino.linear_probe(x[:40], y[:40], x[40:], y[40:], epochs=30, lr=1.0)
    text = repr(probe)
    assert text.startswith("LinearProbe(classifier=Linear(8 -> 2), accuracy=") and "epochs=30" in text
    assert len(text) < 120 and "top1" not in text  # the 30 history records are not printed
    assert probe.history[0]["epoch"] == 0 and probe.history[-1]["epoch"] == 29
