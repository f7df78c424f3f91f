"""The augmentation paths wired into training (data.augment_device), and the benchmarks that compare
them: bench.data_pipeline at a tiny size, bench.gpu_check's CPU-compatible parts."""

import json
import math
import subprocess
import sys

import pytest
import torch

from bench.data_pipeline import main
from dino_train.config import ConfigError, load_config
from dino_train.data import resolve_augment_device
from dino_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino_train.runtime.distributed import DistEnv
from dino_train.train.build import build_loader
from tests.helpers import REPO, tiny_overrides


@pytest.mark.slow
def test_bench_compares_both_paths_per_process_and_through_the_loader(tmp_path, one_thread, capsys):
    out = tmp_path / "data.json"
    args = ["--images", "4", "--batch", "2", "--workers", "0", "--shapes", "demo", "--json", str(out)]
    assert main(args) == 0  # main keeps torch to one thread: the one_thread fixture restores it
    rows = json.loads(out.read_text())["rows"]
    measures = {(r["path"], r["what"]) for r in rows}
    for path in ("pil", "tensor"):
        for what in ("decode, 1 process", "multi-crop, 1 process", "DataLoader, 0 workers"):
            assert (path, what) in measures
    assert all(r["images_per_s"] > 0 and r["shape"] == "demo" for r in rows)
    tensor = [r for r in rows if r["path"] == "tensor"]
    pil = {r["what"]: r["images_per_s"] for r in rows if r["path"] == "pil"}
    assert all(r["vs_pil"] == pytest.approx(r["images_per_s"] / pil[r["what"]]) for r in tensor)
    assert "vs pil" in capsys.readouterr().out


def test_augment_device_resolves_and_refuses_cuda_without_a_gpu(tmp_path):
    cpu = torch.device("cpu")
    assert resolve_augment_device("auto", cpu) == "cpu" and resolve_augment_device("pil", cpu) == "pil"
    assert resolve_augment_device("auto", torch.device("cuda", 0)) == "cuda"
    with pytest.raises(ValueError, match="data.augment_device='gpu'"):
        resolve_augment_device("gpu", cpu)
    with pytest.raises(ConfigError, match="data.augment_device"):
        load_config(None, ["data.path=x", "data.augment_device=gpu"])
    cfg = load_config(None, ["data.path=x", "data.augment_device=cuda"])
    with pytest.raises(ConfigError, match="data.augment_device=cuda needs a CUDA training device"):
        build_loader(cfg.data, 0, DistEnv(), cpu)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cpu", "pil"])
def test_short_training_runs_on_either_augmentation_path(tiny_data, tmp_path, mode, one_thread):
    from dino_train.train import train

    extra = ("train.epochs=1", "train.num_threads=1", f"data.augment_device={mode}")
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, *extra))
    loader, _ = build_loader(cfg.data, 0, DistEnv(), torch.device("cpu"))
    crops, _, _ = next(iter(loader))
    assert [tuple(c.shape) for c in crops] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    assert all(c.dtype == torch.float32 for c in crops)
    result = train(cfg)
    assert result.step == 5 and result.last_loss is not None and math.isfinite(result.last_loss)


@pytest.mark.slow
def test_gpu_check_script_runs_its_parts_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--steps", "1",
           "--batch", "2", "--peak-tflops", "0.2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["part"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"step", "collectives", "knn", "augment"}
    assert rows["step"]["applied"] and math.isfinite(rows["step"]["loss"]) and rows["step"]["mfu"] > 0
    assert rows["collectives"]["ok"] and rows["collectives"]["backend"] == "gloo" and rows["knn"]["ok"]
    assert rows["augment"]["finish_images_per_s"] > 0


@pytest.mark.parametrize("mode", ["cpu", "pil"])
def test_solarisation_settings_reach_the_training_loader(tiny_data, tmp_path, mode):
    """data.solarize_p / data.solarize_threshold as training reads them, on either augmentation path:
    solarising every crop at threshold 0 (inversion) gives 1 - x of the crops solarised at 256 (no pixel
    is that bright: the same random numbers, nothing inverted)."""
    cpu = torch.device("cpu")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def first_batch(*extra: str) -> list[torch.Tensor]:
        overrides = tiny_overrides(tiny_data, tmp_path, f"data.augment_device={mode}", *extra)
        loader, _ = build_loader(load_config(None, overrides).data, 0, DistEnv(), cpu)
        return [c * std + mean for c in next(iter(loader))[0]]

    plain = first_batch("data.solarize_p=[1.0, 1.0, 1.0]", "data.solarize_threshold=256")
    inverted = first_batch("data.solarize_p=[1.0, 1.0, 1.0]", "data.solarize_threshold=0")
    for p, q in zip(plain, inverted, strict=True):
        torch.testing.assert_close(q, 1 - p, atol=1e-5, rtol=0)
    if mode == "cpu":  # the tensor path draws the same numbers whatever the probabilities
        never = first_batch("data.solarize_p=[0.0, 0.0, 0.0]")
        released = first_batch()  # global crop 2 alone may be solarised at 128
        assert all(torch.equal(r, n) or c == 1 for c, (r, n) in enumerate(zip(released, never, strict=True)))
        assert all(torch.allclose(n, p, atol=1e-5) for n, p in zip(never, plain, strict=True))
