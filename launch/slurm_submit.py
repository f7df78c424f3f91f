"""Submitting through submitit: the shared folder, asking the cluster before submitting, the sbatch
script, what to print about a job, waiting for it, and the bounded requeue that both launchers share."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.slurm_resources import LaunchError, SlurmResources, executor_parameters


def import_submitit() -> Any:
    try:
        import submitit
        import submitit.slurm.slurm  # noqa: F401  (the sbatch renderer used by the dry run)
    except ImportError as err:
        raise LaunchError(
            f"submitit is not installed ({err}); install it with `pip install submitit` in this environment"
        ) from err
    return submitit


def static_prefix(folder: Path) -> Path:
    """The part of a folder path before its first ``%`` pattern (``/shared/dino/%j`` -> ``/shared/dino``)."""
    parts = []
    for part in folder.parts:
        if "%" in part:
            break
        parts.append(part)
    return Path(*parts) if parts else Path.cwd()


def prepare_shared_dir(folder: str | Path, create_parents: bool) -> Path:
    """Make the shared folder (up to its first ``%j``) and check that it can be written.

    ``create_parents`` is for defaults the launcher chose; a folder the user named must have an existing
    parent, because a missing one is far more often a typo or an unmounted file system than a wish."""
    path = Path(folder).expanduser().absolute()
    prefix = static_prefix(path)
    if not create_parents and not prefix.parent.is_dir():
        raise LaunchError(
            f"--shared-dir {folder}: its parent {prefix.parent} does not exist "
            "(a typo, or the shared file system is not mounted here?)"
        )
    try:
        prefix.mkdir(parents=True, exist_ok=True)
        probe = prefix / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise LaunchError(f"--shared-dir {folder}: cannot write in {prefix} ({err.strerror or err})") from err
    return path


def submitit_command(folder: Path, python: str | None = None) -> str:
    """The command submitit puts in the script (kept equal to ``SlurmExecutor._submitit_command_str``)."""
    python = python or shlex.quote(sys.executable)
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(
    res: SlurmResources, folder: Path, array_size: int | None = None, array_parallelism: int | None = None
) -> str:
    """The sbatch script submitit would submit, rendered by submitit's own (private) renderer."""
    submitit = import_submitit()
    params = executor_parameters(res, array_parallelism)
    if array_size is not None and array_size > 1:
        params["map_count"] = array_size
    return submitit.slurm.slurm._make_sbatch_string(command=submitit_command(folder), folder=folder, **params)


def partitions() -> list[str] | None:
    """The cluster's partition names, from ``sinfo``; None where sinfo is not installed."""
    if shutil.which("sinfo") is None:
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise LaunchError(
            f"cannot ask Slurm for its partitions: sinfo exit {proc.returncode}: {_last_line(proc.stderr)}"
        )
    return sorted({line.strip().rstrip("*") for line in proc.stdout.splitlines() if line.strip()})


def check_cluster(res: SlurmResources, folder: Path, array_size: int | None = None) -> None:
    """Ask the cluster before submitting: is there a Slurm, does the partition exist, and would
    ``sbatch --test-only`` accept the script (nodes, CPUs, GPUs, memory, time, account, QoS)."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise LaunchError(
            "no Slurm here: sbatch/srun are not on PATH (preview the job with --dry-run, or run train "
            "directly with torchrun)"
        )
    names = partitions()
    if res.partition is not None and names is not None and res.partition not in names:
        raise LaunchError(
            f"--partition {res.partition}: no such partition; this cluster has: {', '.join(names) or 'none'}"
        )
    script = render_sbatch(res, folder, array_size)
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="dino-sbatch-test-") as f:
        f.write(script)
        f.flush()
        proc = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        reason = _last_line(proc.stderr).replace("sbatch: error: ", "")
        raise LaunchError(f"Slurm would refuse this job: {reason} (asked for {res.summary()})")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def make_executor(
    res: SlurmResources, folder: Path, max_requeues: int, array_parallelism: int | None = None
) -> Any:
    """A ``submitit.SlurmExecutor`` holding the request. submitit's own timeout countdown gets the same
    bound as ours, so neither requeues more than the user allowed."""
    submitit = import_submitit()
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    except RuntimeError as err:  # submitit's "Could not detect srun"
        raise LaunchError(f"submitit cannot use Slurm here: {err}") from err
    executor.update_parameters(**executor_parameters(res, array_parallelism))
    return executor


@dataclass
class JobInfo:
    job_id: str
    stdout: Path
    stderr: Path


def job_info(job: Any) -> JobInfo:
    return JobInfo(str(job.job_id), Path(job.paths.stdout), Path(job.paths.stderr))


def describe(job: Any, res: SlurmResources, what: str) -> str:
    """The lines a user needs after submitting: the id, the logs, and how to follow and cancel."""
    info = job_info(job)
    base = info.job_id.split("_")[0]
    lines = [
        f"submitted {what} as Slurm job {info.job_id} ({res.summary()})",
        f"  stdout: {info.stdout}",
        f"  stderr: {info.stderr}",
    ]
    if res.world_size > 1:
        lines.append(f"  (task 0's logs; task t writes {info.stdout.name.replace('_0_', '_<t>_')})")
    lines += [
        f"  follow: tail -f {info.stdout}",
        f"  status: squeue -j {base}   (after it ends: sacct -j {base})",
        f"  cancel: scancel {base}",
    ]
    return "\n".join(lines)


def failure_message(job: Any, err: BaseException) -> str:
    """One line: why a job failed (its exception, or Slurm's state) and where its log is."""
    info = job_info(job)
    text = str(err)
    state = getattr(job, "state", "?")
    # submitit's message holds the job's traceback between two dashed lines; its last line is the
    # exception itself.
    blocks = text.split("----------------------")
    trace = blocks[1] if len(blocks) >= 3 else text
    cause = _last_line(trace) if trace.strip() else f"state {state}"
    if "has not produced any output" in text:
        cause = f"it ended in state {state} without a result: {_job_message(_tail(info.stderr))}"
    return f"job {info.job_id} failed: {cause} (log: {info.stderr})"


def _job_message(log: str) -> str:
    """The job's own last word in its stderr, skipping the lines Slurm and submitit add around it."""
    noise = ("srun:", "slurmstepd", "submitit ")
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    own = [line for line in lines if not line.startswith(noise)]
    return (own or lines or ["(empty log)"])[-1]


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def requeue_or_stop(requeues: int, max_requeues: int, what: str, resubmit: Any) -> Any:
    """What ``checkpoint()`` returns: ``DelayedSubmission(resubmit)`` while requeues are left, else None
    (submitit then ends the job) with the reason in the log."""
    from submitit.helpers import DelayedSubmission

    if requeues >= max_requeues:
        print(
            f"not requeuing {what}: it was requeued {requeues} time(s), the limit (--max-requeues "
            f"{max_requeues}); its checkpoint is kept, so submitting it again continues it",
            file=sys.stderr,
            flush=True,
        )
        return None
    print(f"requeuing {what} ({requeues + 1} of at most {max_requeues})", file=sys.stderr, flush=True)
    return DelayedSubmission(resubmit)
