"""eval_knn and eval_linear in-process on a tiny class-folder data set, and under torchrun (2 CPU ranks)."""

import json
from pathlib import Path

import pytest
import torch

from eval.knn import cli as knn_eval
from eval.linear import cli as linear_eval
from tests.helpers import torchrun

COMMON = ["--resize", "32", "--crop", "32", "--num-workers", "0", "--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(module: str, *args: str) -> None:
    """``python -m module args`` on 2 processes under torchrun, which must succeed."""
    proc = torchrun(2, "-m", module, *args, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_eval_knn_writes_results_and_reuses_features(tiny_data, backbone_file, tmp_path, capsys):
    args = ["--checkpoint", str(backbone_file), "--data", str(tiny_data), "--ks", "1", "5", "20", *COMMON]
    assert (
        knn_eval.main([*args, "--output-dir", str(tmp_path / "a"), "--dump-features", str(tmp_path / "f")])
        == 0
    )
    first = json.loads((tmp_path / "a" / "knn_results.json").read_text())
    assert list(first["results"]) == ["1", "5", "20"]
    assert (first["num_train"], first["num_val"], first["num_classes"]) == (40, 20, 10)
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in first["results"].values())
    assert first["backbone"]["arch"] == "vit_tiny" and not first["features_loaded"]
    assert list((tmp_path / "a" / "tensorboard").iterdir())
    assert " k  top-1  top-5\n" in capsys.readouterr().out

    again = [
        "--load-features",
        str(tmp_path / "f"),
        "--ks",
        "1",
        "5",
        "20",
        "--output-dir",
        str(tmp_path / "b"),
    ]
    assert knn_eval.main(again) == 0
    second = json.loads((tmp_path / "b" / "knn_results.json").read_text())
    assert second["results"] == first["results"] and second["features_loaded"]


@pytest.mark.slow
def test_evaluate_knn_function_matches_the_cli(tiny_data, backbone_file, tmp_path):
    from dino_train.models.loading import load_backbone

    backbone, _ = load_backbone(backbone_file)
    from dino_train.measure.knn_bank import evaluate_knn

    res = evaluate_knn(backbone, tiny_data / "train", tiny_data / "val", ks=(1, 5), resize=32, crop=32)
    assert set(res) == {1, 5}
    assert all(isinstance(v, tuple) and len(v) == 2 for v in res.values())
    args = ["--checkpoint", str(backbone_file), "--data", str(tiny_data), "--ks", "1", "5", *COMMON]
    knn_eval.main([*args, "--output-dir", str(tmp_path)])
    cli = json.loads((tmp_path / "knn_results.json").read_text())["results"]
    assert {int(k): (v["top1"], v["top5"]) for k, v in cli.items()} == res


def test_eval_knn_wrong_arch_is_a_clean_error(tiny_data, backbone_file):
    with pytest.raises(SystemExit, match="error: .*weights are vit_tiny/8.*'vit_base' does not fit"):
        knn_eval.main(
            ["--checkpoint", str(backbone_file), "--arch", "vit_base", "--data", str(tiny_data), *COMMON]
        )


@pytest.mark.slow
@pytest.mark.dist
def test_eval_knn_torchrun_matches_one_process(tiny_data, backbone_file, tmp_path):
    args = ["--checkpoint", str(backbone_file), "--data", str(tiny_data), "--ks", "1", "5", "20", *COMMON]
    knn_eval.main([*args, "--output-dir", str(tmp_path / "one"), "--dump-features", str(tmp_path / "f1")])
    # Batch size 3 gives each rank a ragged last batch.
    _torchrun("eval.knn", *args, "--batch-size", "3", "--output-dir", str(tmp_path / "two"),
              "--dump-features", str(tmp_path / "f2"))  # fmt: skip
    one = json.loads((tmp_path / "one" / "knn_results.json").read_text())
    two = json.loads((tmp_path / "two" / "knn_results.json").read_text())
    assert two["world_size"] == 2 and two["results"] == one["results"]
    f1 = torch.load(tmp_path / "f1" / "knn_features.pth", weights_only=True)
    f2 = torch.load(tmp_path / "f2" / "knn_features.pth", weights_only=True)
    assert torch.equal(f1["train_labels"], f2["train_labels"]) and torch.equal(
        f1["val_labels"], f2["val_labels"]
    )
    torch.testing.assert_close(f1["train_feats"], f2["train_feats"], atol=1e-5, rtol=1e-5)


FEATURE_SCRIPT = """
import sys
import torch
from dino_train.runtime.distributed import cleanup, detect_env, init_distributed
from dino_train.measure.features import extract_features

env = detect_env()
init_distributed(env, torch.device("cpu"))
model = torch.nn.Linear(4, 3)
torch.nn.init.eye_(model.weight)
torch.nn.init.zeros_(model.bias)
out = {}
for n in (7, 1):  # uneven shards (4 + 3 images), and one rank with no image at all
    data = torch.utils.data.TensorDataset(torch.arange(4 * n).float().view(n, 4), torch.arange(n) * 10)
    out[n] = extract_features(model, data, batch_size=2, num_workers=0, device="cpu", progress=False)
torch.save(out, sys.argv[1] + f"/rank{env.rank}.pt")
cleanup()
"""


@pytest.mark.slow
@pytest.mark.dist
def test_extract_features_shards_and_gathers_in_dataset_order(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(FEATURE_SCRIPT)
    proc = torchrun(2, str(script), str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for n in (7, 1):
            feats, labels = out[n]
            assert torch.equal(feats, torch.arange(4 * n).float().view(n, 4)[:, :3])
            assert torch.equal(labels, torch.arange(n) * 10)


def _linear_args(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--data", str(data), "--output-dir", str(out), *COMMON, *extra]


@pytest.mark.slow
def test_eval_linear_grid_saves_the_best_probe_and_evaluates_it(tiny_data, backbone_file, tmp_path):
    grid = ["--epochs", "2", "--lr", "0.01", "1.0", "--n-last-blocks", "1", "2", "--avgpool", "both"]
    assert (
        linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *grid, "--batch-size", "16")) == 0
    )
    res = json.loads((tmp_path / "linear_results.json").read_text())
    assert len(res["probes"]) == 8
    dims = {(p["n_last_blocks"], p["avgpool"]): p["feature_dim"] for p in res["probes"]}
    assert dims == {(1, False): 192, (1, True): 384, (2, False): 384, (2, True): 576}
    best_top1 = max(p["best"]["top1"] for p in res["probes"])
    assert res["best"]["best"]["top1"] == best_top1
    assert all(p["last"]["epoch"] == 1 and 0 <= p["best"]["epoch"] <= 1 for p in res["probes"])  # 0-based
    assert res["probes"][0]["lr_scaled"] == pytest.approx(0.01 * 16 / 256)

    evaluate = ["--evaluate", "--classifier", str(tmp_path / "linear_best.pth")]
    assert linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *evaluate)) == 0
    ev = json.loads((tmp_path / "linear_evaluate.json").read_text())["evaluate"]
    # The saved probe is the best epoch's weights, and val features are deterministic.
    assert (ev["top1"], ev["top5"]) == (res["best"]["best"]["top1"], res["best"]["best"]["top5"])


@pytest.mark.slow
def test_eval_linear_resumes_after_an_interruption(tiny_data, backbone_file, tmp_path, monkeypatch):
    run = ["--epochs", "3", "--lr", "0.5", "--n-last-blocks", "1", "--cached-features", "--batch-size", "8"]
    linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path / "full", *run))
    calls = []
    real = linear_eval.train_one_epoch

    def crash_in_epoch_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("preempted")
        return real(*a, **k)

    monkeypatch.setattr(linear_eval, "train_one_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path / "cut", *run))
    assert torch.load(tmp_path / "cut" / "linear_checkpoint.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(linear_eval, "train_one_epoch", real)
    linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path / "cut", *run))
    full = torch.load(tmp_path / "full" / "linear_classifiers.pth", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "linear_classifiers.pth", weights_only=True)
    for k, v in full["last"].items():
        torch.testing.assert_close(cut["last"][k], v)
    with pytest.raises(SystemExit, match="different epochs"):
        linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path / "cut", *run[:1], "5", *run[2:]))


@pytest.mark.slow
@pytest.mark.dist
def test_eval_linear_torchrun_matches_one_process(tiny_data, backbone_file, tmp_path):
    # Cached features: 2 ranks x batch 4 see exactly the images 1 rank x batch 8 sees, so the averaged
    # gradients, and hence the probes, must agree.
    run = ["--epochs", "2", "--lr", "0.5", "--n-last-blocks", "1", "--cached-features"]
    linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path / "one", *run, "--batch-size", "8"))
    _torchrun(
        "eval.linear.cli",
        *_linear_args(tiny_data, backbone_file, tmp_path / "two", *run, "--batch-size", "4"),
    )
    one = torch.load(tmp_path / "one" / "linear_classifiers.pth", weights_only=True)["last"]
    two = torch.load(tmp_path / "two" / "linear_classifiers.pth", weights_only=True)["last"]
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, atol=1e-5, rtol=1e-4)
    res = json.loads((tmp_path / "two" / "linear_results.json").read_text())
    assert res["total_batch"] == 8


@pytest.mark.slow
def test_eval_linear_evaluates_a_release_format_classifier(tiny_data, backbone_file, tmp_path):
    run = ["--epochs", "2", "--lr", "0.5", "--n-last-blocks", "1", "--avgpool", "no", "--cached-features"]
    linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *run, "--batch-size", "8"))
    res = json.loads((tmp_path / "linear_results.json").read_text())["best"]["best"]
    best = torch.load(tmp_path / "linear_best.pth", weights_only=True)["state_dict"]
    # The release's *_linearweights.pth layout: module.linear.* under state_dict, no feature settings.
    release = {"state_dict": {f"module.{k}": v for k, v in best.items()}, "epoch": 2, "best_acc": 0.0}
    torch.save(release, tmp_path / "release_linear.pth")
    evaluate = ["--evaluate", "--classifier", str(tmp_path / "release_linear.pth"), "--n-last-blocks", "1"]
    linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *evaluate, "--avgpool", "no"))
    ev = json.loads((tmp_path / "linear_evaluate.json").read_text())["evaluate"]
    assert (ev["top1"], ev["top5"]) == (res["top1"], res["top5"])
    with pytest.raises(SystemExit, match="takes 192-d features but n_last_blocks=4"):
        linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *evaluate[:-1], "4"))


def test_a_standardised_grid_folds_into_plain_probes_on_raw_features():
    from eval.linear.model import GridPoint, LinearGrid, feature_stats, variant_features

    torch.manual_seed(0)
    tokens = torch.randn(64, 4, 8) * torch.logspace(-3, 2, 8) + torch.randn(8) * 5  # scales far apart
    points = [GridPoint(0.1, n, pool) for n in (1, 3) for pool in (False, True)]
    grid = LinearGrid(points, 8, 5, feature_stats(tokens))
    shift, scale = tokens.mean(0), tokens.std(0) + 1e-6
    for i, (p, logits) in enumerate(zip(points, grid(tokens), strict=True)):
        # What the classifier sees: the standardised token slots, selected as the variant selects them.
        z = variant_features((tokens - shift) / scale, p.n_last_blocks, p.avgpool)
        torch.testing.assert_close(logits, z @ grid.heads[i].weight.T + grid.heads[i].bias)
        state = grid.head_state(i)
        raw = variant_features(tokens, p.n_last_blocks, p.avgpool) @ state["weight"].T + state["bias"]
        torch.testing.assert_close(raw, logits, atol=1e-4, rtol=1e-4)
    plain = LinearGrid(points, 8, 5)
    assert torch.equal(plain.head_state(0)["weight"], plain.heads[0].weight)
    with pytest.raises(ValueError, match=r"two \(4, 8\) tensors"):
        LinearGrid(points, 8, 5, (shift[:3], scale[:3]))


@pytest.mark.slow
def test_eval_linear_standardize_is_the_scorecard_probe(tiny_data, backbone_file, tmp_path):
    from dino_train.models.loading import load_backbone
    from eval.scorecard import evaluate_linear

    run = ["--epochs", "3", "--lr", "0.3", "--batch-size", "16", "--cached-features", "--standardize"]
    assert linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *run)) == 0
    res = json.loads((tmp_path / "linear_results.json").read_text())
    model, _ = load_backbone(backbone_file)
    card = evaluate_linear(
        model.eval(),
        tiny_data / "train",
        tiny_data / "val",
        lr=0.3,
        epochs=3,
        resize=32,
        crop=32,
        batch_size=16,
    )
    assert res["settings"]["standardize"] and res["best"]["last"]["top1"] == card
    # The saved probe takes raw features (the standardisation folded in) and scores what training saw.
    evaluate = ["--evaluate", "--classifier", str(tmp_path / "linear_best.pth")]
    assert linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *evaluate)) == 0
    ev = json.loads((tmp_path / "linear_evaluate.json").read_text())["evaluate"]
    assert (ev["top1"], ev["top5"]) == (res["best"]["best"]["top1"], res["best"]["best"]["top5"])
    with pytest.raises(SystemExit, match="different standardize"):
        linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *run[:-1]))


@pytest.mark.slow
def test_eval_linear_standardize_with_augmentation_saves_a_probe_on_raw_features(
    tiny_data, backbone_file, tmp_path
):
    # Augmented training: the statistics come from a centre-crop view of the train split.
    run = ["--epochs", "2", "--lr", "0.3", "--batch-size", "16", "--standardize", "--n-last-blocks", "1"]
    assert linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *run)) == 0
    res = json.loads((tmp_path / "linear_results.json").read_text())
    assert res["settings"]["standardize"] and not res["cached_features"]
    evaluate = ["--evaluate", "--classifier", str(tmp_path / "linear_best.pth")]
    assert linear_eval.main(_linear_args(tiny_data, backbone_file, tmp_path, *evaluate)) == 0
    ev = json.loads((tmp_path / "linear_evaluate.json").read_text())["evaluate"]
    assert (ev["top1"], ev["top5"]) == (res["best"]["best"]["top1"], res["best"]["best"]["top5"])
