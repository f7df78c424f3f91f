"""The demo's promise: its DINO run on the embedded data set leaves the ln K plateau (the loss falls
below it) and gives a teacher whose k-NN and linear-probe accuracy on the held-out split beat a randomly
initialised backbone of the same shape, with the collapse detector quiet.

Only the first 250 of the demo's 558 steps run. Measured in the demo's own run (2026-12-07, a 2-core
Intel Xeon with AMX, bf16): the mean DINO loss over steps 201-250 was 7.87 (ln 4096 = 8.32; the test asks
for below 8.07), and k-NN k=20 61.0 after step 310 against 31.0 for random init.
"""

import json
import math
import os
import shutil

import pytest

from dino_train.config import load_config
from dino_train.data import generate_embedded_dataset
from dino_train.measure.knn_bank import evaluate_knn
from dino_train.train import train
from launch.demo import compare_to_random
from tests.helpers import REPO

pytestmark = pytest.mark.slow

STEPS = 250
# Both cores when alone; one under `make test`'s two xdist workers, where the other worker holds the second
# (two threads there were oversubscribed: the run took 602 s against 280 s alone).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(scope="module")
def demo_half(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    root = generate_embedded_dataset(tmp / "embedded")  # the demo's data, default size
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.path={root / 'train'}",
            f"train.output_dir={tmp / 'run'}",
            f"train.max_steps={STEPS}",
            f"train.num_threads={THREADS}",
            "train.progress_bar=false",
        ],
    )
    result = train(cfg)
    return result, compare_to_random(result.teacher.backbone, cfg, root), root


def test_demo_run_is_healthy(demo_half):
    result, _, _ = demo_half
    assert result.step == STEPS
    assert result.warnings == []


def test_demo_loss_leaves_the_ln_k_plateau(demo_half):
    result, _, _ = demo_half
    rows = [json.loads(x) for x in (result.output_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss_dino"] for r in rows if r["kind"] == "step" and r["step"] > STEPS - 50]
    ln_k = math.log(4096)  # configs/demo.yaml's out_dim; a flat teacher and student give exactly ln K
    assert sum(losses) / len(losses) < ln_k - 0.25, losses


def test_dino_teacher_beats_random_init_on_knn(demo_half):
    _, scores, _ = demo_half
    random, trained = scores["random init"], scores["DINO teacher"]
    assert trained["k-NN k=10"] > random["k-NN k=10"] + 5.0, scores
    assert trained["k-NN k=20"] > random["k-NN k=20"] + 5.0, scores


def test_dino_teacher_beats_random_init_on_linear_probe(demo_half):
    _, scores, _ = demo_half
    assert scores["DINO teacher"]["linear probe"] > scores["random init"]["linear probe"] + 4.0, scores


def test_demo_leaves_a_run_of_another_model_alone(tmp_path):
    from dino_train.config import save_config
    from launch.demo import free_output_dir

    recipe = REPO / "configs" / "demo.yaml"
    cfg = load_config(recipe, [f"train.output_dir={tmp_path / 'demo'}"])
    assert free_output_dir(cfg) == []  # nothing there yet
    (tmp_path / "demo").mkdir()
    save_config(cfg, tmp_path / "demo" / "config.yaml")
    assert free_output_dir(cfg) == []  # the same model: resume there
    other = load_config(recipe, [f"train.output_dir={tmp_path / 'demo'}", "model.out_dim=1024"])
    save_config(other, tmp_path / "demo" / "config.yaml")
    assert free_output_dir(cfg) == []  # no checkpoint: nothing to resume, nothing to protect
    (tmp_path / "demo" / "checkpoint.pth").write_bytes(b"a run of the 1024-prototype model")
    (tmp_path / "demo-1").mkdir()
    assert free_output_dir(cfg) == [f"train.output_dir={tmp_path / 'demo'}-2"]


def test_demo_prints_the_attention_references_under_the_jaccard(tiny_data, backbone_file, capsys):
    """The scorecard's Jaccard row is followed by the two references without a model, computed on the
    same val masks at the backbone's patch size."""
    from dino_train.measure.jaccard import EVEN, PRIOR, reference_jaccards
    from dino_train.measure.masks import load_masked_images
    from dino_train.models.loading import load_backbone
    from eval.scorecard import JACCARD
    from launch.demo import TARGETS, attention_references, print_report

    vit, _ = load_backbone(str(backbone_file))
    refs = attention_references(vit, tiny_data)
    _, masks = load_masked_images(tiny_data / "val", tiny_data / "val_masks", 8)
    assert refs == pytest.approx(reference_jaccards(masks, 8))
    row = {"k-NN k=20": 50.0, JACCARD: 20.0}
    report = {"steps": 3, "ln_K": 8.3, "loss": [8.3, 6.0], "entropy ratio": [0.9, 0.6], "warnings": [],
              "scores": {"random init": row, "DINO teacher": row}, "attention references": refs}  # fmt: skip
    print_report(report, TARGETS["long"])
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if JACCARD in line and "NOT met" in line)
    assert f"{refs[PRIOR]:.1f} for the other masks' mean" in lines[at + 1]
    assert f"{refs[EVEN]:.1f} for attention even on each object" in lines[at + 1]


def test_targets_judge_floors_margins_and_ceilings():
    """A demo target's parts are judged apart: the floor, the margin over random init, the margin over the
    no-model prior (skipped when there is none), and a ceiling for the teacher's entropy."""
    from launch.demo import TARGETS, Target

    target = Target(50.0, above_random=15.0, above_prior=15.0)
    assert target.check(52.0, random=30.0, prior=40.0) == [
        (">= 50", True),
        ("+15 over random", True),
        ("+15 over the prior", False),
    ]
    assert target.check(49.0, random=35.0) == [(">= 50", False), ("+15 over random", False)]
    assert Target(at_most=0.7).check(0.72) == [("<= 0.7", False)]
    assert TARGETS["short"]["k-NN k=20"].check(65.0) == [(">= 65", True)]


def test_continued_pretraining_from_the_teacher_keeps_its_knn(demo_half, tmp_path):
    """Continuing self-supervised training from a backbone without its head (dinov2 #204: k-NN fell from
    80% to about 10% soon after unfreezing a released backbone with a fresh head): the demo's teacher
    backbone, a fresh head trained alone for the first epoch (train.freeze_backbone_epochs), then everything,
    keeps its k-NN within a few points of where it started."""
    result, scores, root = demo_half
    subset = tmp_path / "subset"
    for folder in sorted((root / "train").iterdir()):  # 32 images a class: 10 steps an epoch
        (subset / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:32]:
            shutil.copy(f, subset / folder.name / f.name)
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.path={subset}",
            f"train.output_dir={tmp_path / 'more'}",
            f"model.init_weights={result.output_dir / 'teacher_backbone.pth'}",
            "train.freeze_backbone_epochs=1",
            "train.max_steps=30",  # the head alone for 10 steps, then 20 steps of the whole model
            f"train.num_threads={THREADS}",
            "train.progress_bar=false",
        ],
    )
    more = train(cfg)
    assert more.step == 30
    knn = evaluate_knn(more.teacher.backbone.cpu().float().eval(), root / "train", root / "val", ks=(20,),
                       resize=64, crop=64, batch_size=128)  # fmt: skip
    start = scores["DINO teacher"]["k-NN k=20"]
    assert knn[20][0] > start - 5.0, (knn[20][0], start)
