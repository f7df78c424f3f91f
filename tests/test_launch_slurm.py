"""The Slurm launchers without a cluster: the sbatch script a dry run prints, where files go, the bounded
requeue, and the one-line errors for bad input (tests/test_slurm.py runs them on a real Slurm)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dino_train.config import load_config
from launch import slurm, slurm_eval
from launch.slurm_resources import LaunchError, format_time, parse_time

DATA = ["data.path=/datasets/imagenet/train"]  # never read: nothing here trains


def _run(capsys, main, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip()


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("72:00:00", 4320), ("3-00:00:00", 4320), ("1-12", 2160), ("10:30", 11), ("0-00:00:01", 1)],
)
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


def test_time_round_trip_and_bad_time():
    assert format_time(4320) == "3-00:00:00" and format_time(90) == "01:30:00"
    with pytest.raises(LaunchError, match="not a Slurm time"):
        parse_time("3 days")


def test_dry_run_prints_the_sbatch_script(capsys, tmp_path):
    shared = tmp_path / "shared" / "%j"
    flags = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "72:00:00"]
    flags += ["--cpus-per-task", "10", "--mem-gb", "480", "--account", "acct", "--qos", "high"]
    flags += ["--constraint", "volta32gb", "--shared-dir", str(shared), "--dry-run"]
    code, out, err = _run(capsys, slurm.main, *flags, *DATA, "optim.lr=0.001")
    assert code == 0, err
    lines = out.splitlines()
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=480G",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=acct",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=volta32gb",
        "#SBATCH --time=4320",
        "#SBATCH --job-name=dino",
        "#SBATCH --signal=USR2@120",
        f"#SBATCH --output={shared}/%j_0_log.out",
        f"#SBATCH --error={shared}/%j_0_log.err",
    ]:
        assert line in lines, line
    assert not any("wckey" in line for line in lines)  # submitit's default wckey breaks some clusters
    srun = next(line for line in lines if line.startswith("srun "))
    assert f"--output {shared}/%j_%t_log.out" in srun and srun.endswith(f"-m submitit.core._submit {shared}")
    # No output_dir in the config: training writes inside the shared folder; %j becomes the job id there.
    assert f"# train.output_dir: {shared}/train" in lines
    assert "# world size: 16 process(es); max requeues: 3" in lines
    assert not shared.parent.exists()  # a dry run writes nothing


def test_dry_run_cpu_cluster_extra_options_and_default_folders(capsys, tmp_path):
    out_dir = tmp_path / "run"
    flags = ["--tasks-per-node", "4", "--time", "90", "--sbatch", "mail-type=END", "--setup", "module load x"]
    code, out, err = _run(capsys, slurm.main, *flags, "--dry-run", *DATA, f"train.output_dir={out_dir}")
    assert code == 0, err
    lines = out.splitlines()
    assert "#SBATCH --ntasks-per-node=4" in lines and "#SBATCH --time=90" in lines
    assert "#SBATCH --mail-type=END" in lines and "module load x" in lines
    assert not any("gpus" in line or "partition" in line for line in lines)
    assert f"#SBATCH --output={out_dir}/slurm/%j/%j_0_log.out" in lines  # logs default under output_dir


def test_plan_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.path=data/train"])
    cfg1, folder, chosen = slurm.plan_dirs(cfg, None)
    assert cfg1.train.output_dir == str(tmp_path / "runs" / "dino") and chosen
    assert folder == tmp_path / "runs" / "dino" / "slurm" / "%j"
    assert cfg1.data.path == str(tmp_path / "data" / "train")  # the job sees the same files anywhere
    cfg2, folder, chosen = slurm.plan_dirs(cfg, "/shared/x/%j")
    assert cfg2.train.output_dir == "/shared/x/%j/train" and folder == Path("/shared/x/%j") and not chosen
    cfg3, _, _ = slurm.plan_dirs(load_config(None, ["data.path=d", "train.output_dir=/o"]), "/shared/x")
    assert cfg3.train.output_dir == "/o"


def test_output_dir_gets_the_job_id_inside_the_job(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # what submitit's sbatch script exports
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = load_config(None, [*DATA, "train.output_dir=/shared/%j/train"])
    assert slurm.with_job_id(cfg).train.output_dir == "/shared/4242/train"


def test_requeues_are_bounded(capsys):
    job = slurm.TrainJob(load_config(None, DATA), max_requeues=2)
    again = job.checkpoint()
    assert again.function == slurm.TrainJob(job.cfg, max_requeues=2, requeues=1)
    assert "requeuing training" in capsys.readouterr().err
    assert slurm.TrainJob(job.cfg, max_requeues=2, requeues=2).checkpoint() is None
    err = capsys.readouterr().err
    assert "not requeuing training" in err and "requeued 2 time(s), the limit (--max-requeues 2)" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nodes", "0"], "error: --nodes 0: must be at least 1"),
        (["--time", "3 days"], "error: --time '3 days': not a Slurm time"),
        (
            ["--gpus-per-node", "8", "--tasks-per-node", "4"],
            "error: --tasks-per-node 4 with --gpus-per-node 8",
        ),
        (["--time", "2", "--signal-delay", "120"], "error: --signal-delay 120 s is not shorter than --time"),
        (["--max-requeues", "-1"], "error: --max-requeues -1: must be 0 or more"),
        (["--sbatch", "novalue"], "error: --sbatch 'novalue': expected KEY=VALUE"),
        (["model.archh=vit_small"], "error: "),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(capsys, flags, message):
    code, out, err = _run(capsys, slurm.main, *flags, "--dry-run", *DATA)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith(message), err


def test_shared_dir_problems_are_named(capsys, tmp_path):
    missing = tmp_path / "no" / "such" / "%j"
    code, _, err = _run(capsys, slurm.main, "--shared-dir", str(missing), *DATA)
    assert code == 2 and err == (
        f"error: --shared-dir {missing}: its parent {tmp_path / 'no'} does not exist "
        "(a typo, or the shared file system is not mounted here?)"
    )
    code, _, err = _run(capsys, slurm.main, "--shared-dir", "/sys/dino-shared", *DATA)
    assert code == 2 and err.startswith(
        "error: --shared-dir /sys/dino-shared: cannot write in /sys/dino-shared ("
    )


def test_missing_submitit_is_named(capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "submitit" or m.startswith("submitit.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "submitit", None)  # what `import submitit` sees when it is absent
    code, _, err = _run(capsys, slurm.main, "--dry-run", *DATA)
    assert (
        code == 2 and err.startswith("error: submitit is not installed (") and "pip install submitit" in err
    )


def test_submit_without_slurm_commands(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun or sinfo
    code, _, err = _run(capsys, slurm.main, "--shared-dir", str(tmp_path / "s"), *DATA)
    assert code == 2 and err.startswith("error: no Slurm here: sbatch/srun are not on PATH")


def test_eval_dry_run_is_one_array(capsys, tmp_path, tiny_data):
    ckpts = []
    for name in ("a", "b", "c"):
        ckpts.append(tmp_path / name / "checkpoint.pth")
        ckpts[-1].parent.mkdir()
        ckpts[-1].write_bytes(b"")
    args = ["--checkpoints", *map(str, ckpts), "--data", str(tiny_data), "--output-dir", str(tmp_path / "e")]
    args += ["--array-parallelism", "2", "--gpus-per-node", "1", "--dry-run", "--", "--ks", "10"]
    code, out, err = _run(capsys, slurm_eval.main, *args)
    assert code == 0, err
    lines = out.splitlines()
    assert "#SBATCH --array=0-2%2" in lines and "#SBATCH --gpus-per-node=1" in lines
    assert f"#SBATCH --output={tmp_path}/e/slurm/%A_%a/%A_%a_0_log.out" in lines
    assert f"#   knn: {ckpts[1]} -> {tmp_path}/e/01-b-checkpoint" in lines


def test_eval_bad_input(capsys, tmp_path, tiny_data):
    code, _, err = _run(
        capsys, slurm_eval.main, "--checkpoints", str(tmp_path / "x.pth"), "--data", str(tiny_data)
    )
    assert code == 2 and err == f"error: --checkpoints: {tmp_path / 'x.pth'} is not a file"
    code, _, err = _run(capsys, slurm_eval.main, "--checkpoints", "x.pth", "--data", str(tmp_path))
    assert (
        code == 2 and err == f"error: --data {tmp_path}: no train/ folder (evaluation needs train/ and val/)"
    )
    code, _, err = _run(capsys, slurm_eval.main, "--collect", str(tmp_path))
    assert code == 2 and "no slurm_eval.json there" in err


def test_eval_task_reports_eval_errors_as_exceptions(tmp_path, tiny_data):
    # The eval mains exit with SystemExit("error: ..."); submitit records only Exceptions as a job's error.
    task = slurm_eval.EvalTask("knn", str(tmp_path / "missing.pth"), str(tiny_data), str(tmp_path / "o"))
    with pytest.raises(RuntimeError, match=str(tmp_path / "missing.pth")) as info:
        task()
    assert not str(info.value).startswith("error: ")


def test_results_read_back_for_the_table(tmp_path):
    import json

    knn = {"results": {"10": {"top1": 71.234, "top5": 90.0}, "20": {"top1": 70.0, "top5": 89.0}}}
    (tmp_path / "knn_results.json").write_text(json.dumps(knn))
    assert slurm_eval.read_result("knn", tmp_path) == {"k=10": 71.23, "k=20": 70.0}
    best = {"name": "lr0.001_n4_avgpool", "best": {"top1": 75.555, "top5": 92.0, "epoch": 90}}
    (tmp_path / "linear_results.json").write_text(json.dumps({"best": best, "probes": [best]}))
    assert slurm_eval.read_result("linear", tmp_path) == {
        "probe": best["name"],
        "top-1": 75.56,
        "top-5": 92.0,
    }
