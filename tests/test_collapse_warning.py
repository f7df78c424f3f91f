"""The collapse detector: it fires after its patience, once per episode, on constructed teacher outputs
through the metrics, and a real run whose teacher goes uniform warns."""

import json

import pytest
import torch

from dino_train.config import load_config
from dino_train.core.metrics import dino_metrics, feature_std
from dino_train.monitor.health import CollapseDetector
from dino_train.train import train
from tests.helpers import tiny_overrides


def test_detector_fires_after_patience_once_per_episode():
    d = CollapseDetector(patience=2)
    uniform = {
        "teacher_entropy_ratio": 0.99,
        "batch_entropy_ratio": 1.0,
        "teacher_information": 0.004,
        "prototypes_in_use": 50,
        "student_feature_std": 0.05,
    }
    assert d.check(uniform, 1) == []
    fired = d.check(uniform, 2)
    assert len(fired) == 1 and "uniform collapse" in fired[0] and "teacher_temp" in fired[0]
    assert d.check(uniform, 3) == []  # not repeated while it lasts
    one = {
        "teacher_entropy_ratio": 0.0,
        "batch_entropy_ratio": 0.0,
        "teacher_information": 0.0,
        "prototypes_in_use": 1,
        "student_feature_std": 1e-5,
    }
    d.check(one, 4)
    fired = d.check(one, 5)
    assert any("one-prototype" in w and "center_momentum" in w for w in fired)
    assert any("feature collapse" in w for w in fired)
    healthy = {
        "teacher_entropy_ratio": 0.5,
        "batch_entropy_ratio": 0.6,
        "teacher_information": 0.8,
        "prototypes_in_use": 40,
        "student_feature_std": 0.04,
    }
    assert all(d.check(healthy, s) == [] for s in range(6, 20))
    # Flat but still image-dependent (the demo's early phase): not a collapse.
    flat = {
        **healthy,
        "teacher_entropy_ratio": 0.985,
        "batch_entropy_ratio": 0.997,
        "teacher_information": 0.1,
    }
    assert all(d.check(flat, s) == [] for s in range(20, 40))
    # The same flatness once the information is gone is.
    gone = {**flat, "teacher_information": 0.01}
    assert [len(d.check(gone, s)) for s in (40, 41)] == [0, 1]


def _observed(teacher: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    """What a logging step hands the detector, from constructed teacher outputs (2B, K) and features."""
    student = torch.randn(2 * teacher.shape[0], teacher.shape[1])
    metrics = dino_metrics(student, teacher, torch.zeros(1, teacher.shape[1]), 0.04, 0.1)
    return {n: v.item() for n, v in metrics.items()} | {"student_feature_std": feature_std(features).item()}


def test_detector_fires_on_constructed_outputs_through_the_metrics():
    torch.manual_seed(0)
    k, b, d = 256, 16, CollapseDetector(patience=2)
    spread = torch.randn(2 * b, 32)
    uniform = _observed(torch.zeros(2 * b, k), spread)
    fired = [w for s in (1, 2) for w in d.check(uniform, s)]
    assert len(fired) == 1 and "uniform collapse" in fired[0], fired

    one_hot = torch.zeros(2 * b, k)
    one_hot[:, 7] = 50.0
    collapsed = _observed(one_hot, torch.ones(2 * b, 32) + 1e-6 * torch.randn(2 * b, 32))
    fired = [w for s in (3, 4) for w in d.check(collapsed, s)]
    assert sorted(w.split(": ")[1] for w in fired) == ["feature collapse", "one-prototype collapse"], fired

    # Flat but image-dependent outputs (logits with std 0.4 after the temperature): above the uniform
    # entropy threshold, yet each image leans to its own prototypes, so not a collapse.
    flat = _observed(torch.randn(2 * b, k) * 0.04 * 0.4, spread)
    assert flat["teacher_entropy_ratio"] > d.uniform_entropy_ratio
    assert flat["teacher_information"] > d.min_information
    assert [w for s in range(5, 15) for w in d.check(flat, s)] == []


@pytest.mark.slow
def test_a_run_whose_teacher_goes_uniform_warns(tiny_data, tmp_path, one_thread):
    # A teacher temperature of 10 flattens the centred teacher output (logits within [-1, 1]) to uniform.
    result = train(
        load_config(
            None,
            tiny_overrides(
                tiny_data, tmp_path / "run", "dino.teacher_temp=10.0", "dino.warmup_teacher_temp=10.0"
            ),
        )
    )
    assert len(result.warnings) == 1 and "uniform collapse" in result.warnings[0], result.warnings
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["message"] for r in logged if r["kind"] == "warning"] == result.warnings
