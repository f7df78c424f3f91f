"""The Slurm launcher against a real one-node Slurm (tests/slurm_cluster.py): a DINO run submitted through
submitit, a preempted run that requeues and resumes, and the checks that ask the cluster.

The cluster is installed (apt-get, as root) and started once per session; where that is impossible the
tests skip with the exact cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_train.config import load_config
from launch.slurm import TrainSummary, main, submit_train
from launch.slurm_resources import SlurmResources
from tests.helpers import tiny_overrides
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable, start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="session")
def slurm() -> LocalSlurm:
    try:
        cluster = start_cluster()
    except SlurmUnavailable as err:
        pytest.skip(f"no Slurm for the tests: {err}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # for submitit's sbatch/sacct/scontrol and for the jobs
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _resources(cluster: LocalSlurm, **kw) -> SlurmResources:
    return SlurmResources(cpus_per_task=1, time_min=10, partition=cluster.partition, signal_delay_s=60, **kw)


def _cfg(data: Path, out: Path, *extra: str):
    # One torch thread per task: the node has 2 CPUs and other tests may run beside these.
    return load_config(None, tiny_overrides(data, out, "train.device=cpu", "train.num_threads=1", *extra))


def _wait(job, cluster: LocalSlurm, timeout: float = 150):
    end = time.monotonic() + timeout
    while not job.done(force_check=True):  # ask sacct each second, not on submitit's slower schedule
        if time.monotonic() > end:
            cluster.cmd("scancel", str(job.job_id), check=False)
            log = (
                Path(job.paths.stdout).read_text(errors="replace")[-3000:]
                if job.paths.stdout.exists()
                else ""
            )
            pytest.fail(f"job {job.job_id} not done after {timeout:.0f} s (state {job.state}); log:\n{log}")
        time.sleep(1)
    return job.results()[0]


def _final_state(cluster: LocalSlurm, job_id: str, timeout: float = 30) -> str:
    """The job's state in accounting once it has left RUNNING (the result file comes a moment before)."""
    end = time.monotonic() + timeout
    state = ""
    while time.monotonic() < end:
        state = cluster.cmd("sacct", "-n", "-X", "-j", job_id, "-o", "State%40").stdout.strip()
        if state and state not in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED"):
            break
        time.sleep(0.5)
    return state


def _queue_state(cluster: LocalSlurm, job_id: str) -> str:
    return cluster.cmd("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()


def test_dino_run_through_submitit(slurm, tiny_data, tmp_path):
    out = tmp_path / "run"
    sub = submit_train(_cfg(tiny_data, out), _resources(slurm), tmp_path / "shared" / "%j", max_requeues=1)
    summary = _wait(sub.job, slurm)
    assert isinstance(summary, TrainSummary)
    assert summary.step == 10 and summary.requeues == 0
    assert (out / "checkpoint.pth").is_file() and (out / "teacher_backbone.pth").is_file()
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps) == 10
    log = Path(sub.job.paths.stdout)
    assert log.parent == tmp_path / "shared" / str(sub.job.job_id)
    assert "1 process(es)" in log.read_text() and "done at step 10" in log.read_text()
    assert _final_state(slurm, str(sub.job.job_id)) == "COMPLETED"


@pytest.mark.dist
def test_two_tasks_form_one_process_group(slurm, tiny_data, tmp_path, monkeypatch):
    # Rank, world size and master address come from Slurm's variables (no torchrun); the job inherits
    # this environment, so a free port keeps it clear of any other session's jobs on this machine.
    from dino_train.runtime.distributed import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "run"
    cfg = _cfg(tiny_data, out, "train.max_steps=3")
    sub = submit_train(cfg, _resources(slurm, tasks_per_node=2), tmp_path / "shared", max_requeues=0)
    summary = _wait(sub.job, slurm)
    assert summary.step == 3 and len(sub.job.results()) == 2
    assert "2 process(es), 32 images/epoch, 2 steps/epoch" in Path(sub.job.paths.stdout).read_text()
    import torch

    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["world_size"] == 2 and state["samples_seen"] == 3 * 8 * 2


def test_preempted_job_requeues_and_resumes(slurm, tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_data, out, "train.epochs=4")  # 20 steps: time to interrupt it after the first
    sub = submit_train(cfg, _resources(slurm), tmp_path / "shared", max_requeues=2)
    job_id = str(sub.job.job_id)
    _wait_for_a_step(sub, out)
    # What Slurm sends before a time limit (--signal=USR2@delay) or a preemption.
    slurm.cmd("scancel", "--signal=USR2", job_id)
    end = time.monotonic() + 60
    while _queue_state(slurm, job_id) != "PENDING":
        assert time.monotonic() < end, f"job {job_id} was not requeued (state {sub.job.state})"
        time.sleep(0.3)
    # Slurm holds a requeued job for cred_expire (10 s here, 120 s by default); start it now instead.
    slurm.cmd("scontrol", "update", f"jobid={job_id}", "starttime=now")
    summary = _wait(sub.job, slurm)
    assert summary.requeues == 1 and summary.step == 20
    log = Path(sub.job.paths.stdout).read_text()
    assert "stopped by SIGUSR2" in log and "resumed from" in log and "done at step 20" in log
    history = slurm.cmd("sacct", "-n", "-X", "-D", "-j", job_id, "-o", "State").stdout.split()
    assert history[0] == "REQUEUED" and _final_state(slurm, job_id) == "COMPLETED", history
    resumed = int(log.split("resumed from")[1].split("step ")[1].split()[0].strip(","))
    assert 0 < resumed < 20


def _wait_for_a_step(sub, out: Path) -> None:
    end = time.monotonic() + 90
    while not ((out / "log.jsonl").exists() and '"step"' in (out / "log.jsonl").read_text()):
        assert time.monotonic() < end and not sub.job.done(), "the job never logged a step"
        time.sleep(0.2)


def test_cancelled_job_leaves_a_checkpoint_and_no_result(slurm, tiny_data, tmp_path):
    from launch.slurm_submit import failure_message

    out = tmp_path / "run"
    sub = submit_train(_cfg(tiny_data, out, "train.epochs=6"), _resources(slurm), tmp_path / "shared")
    _wait_for_a_step(sub, out)
    slurm.cmd("scancel", str(sub.job.job_id))  # SIGTERM, then SIGKILL after KillWait
    assert _final_state(slurm, str(sub.job.job_id)).startswith("CANCELLED")
    end = time.monotonic() + 30  # the state changes at once; the job's processes take a moment to end
    while _queue_state(slurm, str(sub.job.job_id)):
        assert time.monotonic() < end
        time.sleep(0.3)
    assert "stopped by SIGTERM" in Path(sub.job.paths.stdout).read_text()
    assert list(out.glob("checkpoint-step*.pth"))
    # submitit waits 15 s for a missing result file to appear on a slow shared file system; this one is local.
    sub.job._results_timeout_s = 1
    with pytest.raises(Exception) as info:  # no result: a waiting client must not see "finished"
        _wait(sub.job, slurm)
    message = failure_message(sub.job, info.value)
    assert message.startswith(f"job {sub.job.job_id} failed: it ended in state CANCELLED")
    assert "without a result: training stopped by SIGTERM at step " in message


def test_unknown_partition_names_the_existing_ones(slurm, tiny_data, tmp_path, capsys):
    args = ["--partition", "nosuch", "--cpus-per-task", "1", "--shared-dir", str(tmp_path / "s")]
    code = main([*args, *tiny_overrides(tiny_data, tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: --partition nosuch: no such partition; this cluster has: {slurm.partition}"


@pytest.mark.parametrize(
    "flags",
    [["--nodes", "3"], ["--cpus-per-task", "64"], ["--mem-gb", "100000"]],
    ids=["nodes", "cpus", "memory"],
)
def test_impossible_resources_are_refused_before_submitting(slurm, tiny_data, tmp_path, capsys, flags):
    args = ["--cpus-per-task", "1", *flags, "--shared-dir", str(tmp_path / "s")]
    code = main([*args, *tiny_overrides(tiny_data, tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: Slurm would refuse this job: ") and "asked for" in err, err
    assert slurm.cmd("squeue", "-h").stdout.strip() == ""


def test_failed_job_reports_its_error_and_log(slurm, tiny_data, tmp_path):
    # A data folder that exists when submitting but is empty: train() fails inside the job.
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [*tiny_overrides(tiny_data, tmp_path / "run"), f"data.path={empty}"]
    cmd = [sys.executable, "-m", "launch.slurm", "--cpus-per-task", "1", "--wait", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "submitted training as Slurm job" in proc.stdout and "tail -f " in proc.stdout
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: job ") and " failed: " in err and "DataError" in err and "(log: " in err
    assert Path(err.split("(log: ")[1].rstrip(")")).is_file()
    job_id = err.split()[2]
    assert _final_state(slurm, job_id) == "FAILED"


def _backbones(tmp_path: Path) -> list[Path]:
    import torch

    from dino_train.models import build_backbone
    from dino_train.train.checkpoint import export_backbone

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"b{seed}" / "teacher_backbone.pth")
        paths[-1].parent.mkdir()
        export_backbone(build_backbone("vit_tiny", patch_size=8, img_size=32), paths[-1])
    return paths


def test_eval_array_gathers_one_table(slurm, tiny_data, tmp_path, capsys):
    from launch import slurm_eval

    ckpts = _backbones(tmp_path)
    out = tmp_path / "eval"
    flags = ["--resize", "32", "--crop", "32", "--num-workers", "0", "--device", "cpu", "--ks", "5", "10"]
    args = [
        "--checkpoints",
        *map(str, ckpts),
        "--data",
        str(tiny_data),
        "--kind",
        "knn",
        "--output-dir",
        str(out),
    ]
    args += ["--cpus-per-task", "1", "--time", "10", "--wait", "--", *flags]
    assert slurm_eval.main(args) == 0
    text = capsys.readouterr().out
    assert "submitted 2 knn evaluation(s) as Slurm job " in text and "array task i logs to" in text
    rows = json.loads((out / "slurm_eval_results.json").read_text())
    assert [r["checkpoint"] for r in rows] == [str(c) for c in ckpts]
    assert all(r["status"] == "ok" and 0 <= r["k=5"] <= 100 and "k=10" in r for r in rows)
    assert rows[0]["job"].endswith("_0") and rows[1]["job"].endswith("_1")
    assert "checkpoint" in text and "k=5" in text
    assert slurm_eval.main(["--collect", str(out)]) == 0  # the same table from the files alone
    assert json.loads((out / "slurm_eval_results.json").read_text()) == rows
