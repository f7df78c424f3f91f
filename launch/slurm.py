"""Pretraining on Slurm through submitit: the same ``train(cfg)`` that torchrun runs, one process per task.

    python -m launch.slurm --config configs/paper_vit_small16.yaml --nodes 2 --gpus-per-node 8 \\
        --partition P --time 72:00:00 --shared-dir /shared/$USER/dino/%j [section.key=value ...]
    python -m launch.slurm ... --dry-run      # print the sbatch script, submit nothing

Ranks, world size and the master address come from Slurm's variables
(``dino_train.runtime.distributed.detect_env``).
Before a time limit or a preemption Slurm sends USR2: train() writes a checkpoint at the next step
boundary, then submitit calls ``TrainJob.checkpoint()``, which requeues the job (at most --max-requeues
times); the requeued job calls train() again, which resumes from the checkpoint in train.output_dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dino_train.config import Config, ConfigError, TrainConfig, load_config
from dino_train.runtime.cli import HelpFormatter
from launch.slurm_resources import LaunchError, SlurmResources, add_resource_args, resources_from_args
from launch.slurm_submit import (
    check_cluster,
    describe,
    failure_message,
    make_executor,
    prepare_shared_dir,
    render_sbatch,
    requeue_or_stop,
)


@dataclass
class TrainSummary:
    """What a finished job returns (small and picklable, unlike the models in TrainResult)."""

    output_dir: str
    step: int
    epoch: int
    last_loss: float | None
    requeues: int


@dataclass
class TrainJob:
    """The callable submitit pickles and runs on every task. ``requeues`` counts how often it came back."""

    cfg: Config
    max_requeues: int = 3
    requeues: int = 0

    def __call__(self) -> TrainSummary:
        from dino_train.train import train  # in the job only: submitting or a dry run need no torch

        cfg = with_job_id(self.cfg)
        result = train(cfg)
        if result.stopped_by is not None:
            # train() handed the signal on to submitit's handler (dino_train.runtime.signals), which
            # requeues and exits. Still here: SIGTERM (scancel, or a preemption Slurm requeues itself) or a
            # task other than rank 0. Leave without a result (SystemExit is not recorded by submitit), so a
            # waiting client never mistakes this partial run for the job's outcome.
            raise SystemExit(
                f"training stopped by {result.stopped_by} at step {result.step}; the checkpoint in "
                f"{result.output_dir} resumes it"
            )
        return TrainSummary(
            str(result.output_dir),
            result.step,
            result.epoch,
            result.last_loss,
            self.requeues,
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        # train() has already written the checkpoint when the signal reached it; requeueing only has to
        # call train() again, so the resubmitted callable is this one with the count raised.
        again = dataclasses.replace(self, requeues=self.requeues + 1)
        return requeue_or_stop(
            self.requeues, self.max_requeues, f"training in {self.cfg.train.output_dir}", again
        )


def with_job_id(cfg: Config) -> Config:
    """``%j`` in train.output_dir becomes this job's id (kept across requeues, so a requeue resumes)."""
    if "%j" not in cfg.train.output_dir:
        return cfg
    import submitit

    job_id = submitit.JobEnvironment().job_id
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, output_dir=cfg.train.output_dir.replace("%j", job_id))
    )


def plan_dirs(cfg: Config, shared_dir: str | Path | None) -> tuple[Config, Path, bool]:
    """(config with absolute paths, submitit folder, whether the launcher chose the folder).

    Without --shared-dir the logs go to ``<train.output_dir>/slurm/%j``; without an output_dir in the
    recipe or overrides, training writes to ``<shared dir>/train``."""
    out_given = cfg.train.output_dir != TrainConfig().output_dir
    if shared_dir is None:
        out = Path(cfg.train.output_dir).expanduser().absolute()
        folder, chosen = out / "slurm" / "%j", True
    else:
        folder, chosen = Path(shared_dir).expanduser().absolute(), False
        out = Path(cfg.train.output_dir).expanduser().absolute() if out_given else folder / "train"
    # Absolute paths: the job must find the same files whatever its working directory.
    data = str(Path(cfg.data.path).expanduser().absolute()) if cfg.data.path else cfg.data.path
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, output_dir=str(out)),
        data=dataclasses.replace(cfg.data, path=data),
    )
    return cfg, folder, chosen


@dataclass
class Submission:
    job: Any  # submitit.Job
    folder: Path
    output_dir: str  # with %j already replaced by the job id

    def wait(self) -> TrainSummary:
        """Block until the job (and its requeues) end; raises submitit's error if it failed. Every task
        returns a summary; rank 0's is the one that wrote the checkpoints."""
        return self.job.results()[0]


def submit_train(
    cfg: Config,
    resources: SlurmResources,
    shared_dir: str | Path | None = None,
    max_requeues: int = 3,
    check: bool = True,
) -> Submission:
    """Submit ``train(cfg)`` as one Slurm job; the Python API behind ``python -m launch.slurm``."""
    cfg, folder, chosen = plan_dirs(cfg, shared_dir)
    prepare_shared_dir(folder, create_parents=chosen)
    if check:
        check_cluster(resources, folder)
    executor = make_executor(resources, folder, max_requeues)
    try:
        job = executor.submit(TrainJob(cfg, max_requeues))
    except Exception as err:  # sbatch's refusal arrives as submitit's FailedJobError
        raise LaunchError(f"sbatch refused the job: {str(err).strip().splitlines()[-1]}") from err
    return Submission(job, folder, cfg.train.output_dir.replace("%j", str(job.job_id)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", type=Path, help="recipe yaml (see configs/)")
    p.add_argument(
        "--shared-dir",
        help="a folder every node can write, for logs and submitit's files; %%j becomes the job id "
        "(default: <train.output_dir>/slurm/%%j)",
    )
    p.add_argument("--max-requeues", type=int, default=3, help="requeues after preemption or time limit")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and report how it ended")
    p.add_argument("--no-check", action="store_true", help="skip asking sinfo / sbatch --test-only first")
    add_resource_args(p, job_name="dino")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.max_requeues < 0:
            raise LaunchError(f"--max-requeues {args.max_requeues}: must be 0 or more")
        res = resources_from_args(args)
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            cfg, folder, _ = plan_dirs(cfg, args.shared_dir)
            print(render_sbatch(res, folder))
            print("# dry run: nothing was submitted")
            print(f"# submitit folder and logs: {folder}   (%j = the job id)")
            print(f"# train.output_dir: {cfg.train.output_dir}")
            print(f"# world size: {res.world_size} process(es); max requeues: {args.max_requeues}")
            return 0
        sub = submit_train(cfg, res, args.shared_dir, args.max_requeues, check=not args.no_check)
        print(describe(sub.job, res, "training"))
        print(f"  training output (checkpoints, log.jsonl, TensorBoard): {sub.output_dir}", flush=True)
        if not args.wait:
            return 0
        try:
            summary = sub.wait()
        except KeyboardInterrupt:
            print(f"\nstopped waiting; job {sub.job.job_id} goes on (scancel {sub.job.job_id} stops it)")
            return 130
        except Exception as err:
            print(f"error: {failure_message(sub.job, err)}", file=sys.stderr)
            return 2
        print(f"job {sub.job.job_id} finished at step {summary.step} after {summary.requeues} requeue(s)")
    except (LaunchError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
