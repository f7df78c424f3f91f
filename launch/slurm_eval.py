"""Evaluate many checkpoints on Slurm: one job array, one task per checkpoint, one table at the end.

    python -m launch.slurm_eval --checkpoints runs/a/checkpoint.pth runs/b/checkpoint.pth \\
        --data /datasets/imagenet --kind knn --gpus-per-node 1 --partition P --wait [-- --ks 10 20]
    python -m launch.slurm_eval --checkpoints runs/a/checkpoint.pth --data /datasets/cifar10 \
        --kind finetune --gpus-per-node 8 --time 24:00:00 --wait -- --epochs 100
    python -m launch.slurm_eval --collect runs/eval_slurm     # the table of a run submitted earlier

Each task runs the same main as ``eval_knn`` / ``eval_linear`` / ``eval_finetune`` (flags after ``--`` go
to it; a task of several processes, ``--gpus-per-node 8``, runs it as one process group) and writes
into ``<output-dir>/<NN>-<name>/``; the table is printed and written to
``<output-dir>/slurm_eval_results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino_train.runtime.cli import HelpFormatter
from dino_train.runtime.files import write_json
from eval.common import EvalExit, print_table
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

RESULT_FILES = {
    "knn": "knn_results.json",
    "linear": "linear_results.json",
    "finetune": "finetune_results.json",
}
MANIFEST = "slurm_eval.json"
RESULTS = "slurm_eval_results.json"


@dataclass
class EvalTask:
    """One checkpoint's evaluation, run by submitit inside an array task."""

    kind: str
    weights: str  # the checkpoint file (``checkpoint`` is the name submitit reserves for the requeue hook)
    data: str
    output_dir: str
    eval_args: list[str] = field(default_factory=list)
    max_requeues: int = 3
    requeues: int = 0

    def argv(self) -> list[str]:
        paths = ["--checkpoint", self.weights, "--data", self.data, "--output-dir", self.output_dir]
        return [*paths, "--no-progress", *self.eval_args]

    def __call__(self) -> dict[str, Any]:
        from eval.finetune import cli as finetune_eval
        from eval.knn import cli as knn_eval
        from eval.linear import cli as linear_eval

        module = {"knn": knn_eval, "linear": linear_eval, "finetune": finetune_eval}[self.kind]
        try:
            module.main(self.argv())
        except SystemExit as stop:
            # The eval mains report bad input as EvalExit (status 2, str() the "error: ..." text), which
            # submitit would not record as the job's error; another int code (submitit's own exit after a
            # requeue) must pass untouched.
            message = str(stop) if isinstance(stop, EvalExit) else stop.code
            if isinstance(message, str):
                raise RuntimeError(message.removeprefix("error: ")) from None
            raise
        return read_result(self.kind, Path(self.output_dir))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        # linear_eval and finetune_eval resume from their checkpoint in output_dir; k-NN starts again.
        again = dataclasses.replace(self, requeues=self.requeues + 1)
        return requeue_or_stop(self.requeues, self.max_requeues, f"{self.kind} eval of {self.weights}", again)


def read_result(kind: str, output_dir: Path) -> dict[str, Any]:
    """The headline numbers of one evaluation, from the JSON its main wrote."""
    data = json.loads((output_dir / RESULT_FILES[kind]).read_text())
    if kind == "knn":
        return {f"k={k}": round(v["top1"], 2) for k, v in data["results"].items()}
    if kind == "finetune":
        best, last = data["best"], data["last"]
        return {
            "top-1": round(best["top1"], 2),
            "top-5": round(best["top5"], 2),
            "best epoch": best["epoch"],
            "last top-1": round(last["top1"], 2),
        }
    best = data["best"]
    return {
        "probe": best["name"],
        "top-1": round(best["best"]["top1"], 2),
        "top-5": round(best["best"]["top5"], 2),
    }


def task_dir(root: Path, index: int, checkpoint: str) -> Path:
    p = Path(checkpoint)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{p.parent.name}-{p.stem}".strip("-"))
    return root / f"{index:02d}-{name}"


def make_tasks(args: argparse.Namespace, root: Path) -> list[EvalTask]:
    data = Path(args.data).expanduser().absolute()
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise LaunchError(f"--data {args.data}: no {split}/ folder (evaluation needs train/ and val/)")
    tasks = []
    for i, ckpt in enumerate(args.checkpoints):
        path = Path(ckpt).expanduser().absolute()
        if not path.is_file():
            raise LaunchError(f"--checkpoints: {ckpt} is not a file")
        out = task_dir(root, i, ckpt)
        tasks.append(
            EvalTask(args.kind, str(path), str(data), str(out), list(args.eval_args), args.max_requeues)
        )
    return tasks


def submit_eval(
    tasks: list[EvalTask],
    res: SlurmResources,
    folder: Path,
    chosen: bool,
    parallelism: int | None,
    check: bool,
) -> list[Any]:
    """Submit the tasks as one array (a single job for one task); returns submitit's jobs."""
    prepare_shared_dir(folder, create_parents=chosen)
    if check:
        check_cluster(res, folder, len(tasks))
    max_requeues = max(t.max_requeues for t in tasks)
    executor = make_executor(res, folder, max_requeues, parallelism)
    try:
        with executor.batch():
            jobs = [executor.submit(t) for t in tasks]
    except Exception as err:
        raise LaunchError(f"sbatch refused the job array: {str(err).strip().splitlines()[-1]}") from err
    return jobs


def gather(root: Path, jobs: list[Any] | None = None) -> tuple[list[dict[str, Any]], bool]:
    """One row per checkpoint, from the jobs' results when given, else from the files they wrote."""
    manifest = json.loads((root / MANIFEST).read_text())
    rows, ok = [], True
    for i, task in enumerate(manifest["tasks"]):
        row = {"checkpoint": task["checkpoint"], "job": task["job_id"]}
        try:
            row.update(
                jobs[i].results()[0] if jobs else read_result(manifest["kind"], Path(task["output_dir"]))
            )
            row["status"] = "ok"
        except FileNotFoundError:
            row["status"] = f"no result yet (sacct -j {task['job_id']})"
            ok = False
        except Exception as err:
            why = failure_message(jobs[i], err).split(" failed: ", 1)[-1] if jobs else str(err)
            row["status"] = f"failed: {why}"
            ok = False
        rows.append(row)
    return rows, ok


def report(root: Path, rows: list[dict[str, Any]]) -> None:
    headers = list(dict.fromkeys(k for r in rows for k in r if k != "status")) + ["status"]
    print_table(headers, [[r.get(h, "") for h in headers] for r in rows])
    write_json(root / RESULTS, rows)
    print(f"results in {root / RESULTS}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm_eval",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoints", nargs="+", default=[], help="checkpoint or backbone files to evaluate")
    p.add_argument("--data", help="folder with train/ and val/ class folders")
    p.add_argument(
        "--kind", choices=sorted(RESULT_FILES), default="knn", help="which evaluation each task runs"
    )
    p.add_argument("--output-dir", default="runs/eval_slurm", help="one sub-folder per checkpoint")
    p.add_argument("--shared-dir", help="logs and submitit's files (default: <output-dir>/slurm/%%j)")
    p.add_argument("--max-requeues", type=int, default=3, help="after preemption or a time limit")
    p.add_argument("--array-parallelism", type=int, help="at most this many tasks at once")
    p.add_argument("--wait", action="store_true", help="wait for every task, then print the table")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    p.add_argument("--no-check", action="store_true", help="skip asking sinfo / sbatch --test-only first")
    p.add_argument("--collect", metavar="OUTPUT_DIR", help="print the table of an earlier submission")
    add_resource_args(p, job_name="dino-eval", cpus_per_task=6)
    p.epilog = "Flags after a lone -- go to eval_knn / eval_linear / eval_finetune unchanged."
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    args.eval_args = argv[cut + 1 :]
    try:
        if args.collect:
            root = Path(args.collect)
            if not (root / MANIFEST).is_file():
                raise LaunchError(
                    f"--collect {root}: no {MANIFEST} there (not a launch.slurm_eval output dir)"
                )
            rows, ok = gather(root)
            report(root, rows)
            return 0 if ok else 2
        if not args.checkpoints or not args.data:
            raise LaunchError("give --checkpoints FILE [FILE ...] and --data DIR (or --collect OUTPUT_DIR)")
        res = resources_from_args(args)
        root = Path(args.output_dir).expanduser().absolute()
        tasks = make_tasks(args, root)
        chosen = args.shared_dir is None
        folder = root / "slurm" / "%j" if chosen else Path(args.shared_dir).expanduser().absolute()
        if args.dry_run:
            print(render_sbatch(res, folder, len(tasks), args.array_parallelism))
            print(f"# dry run: nothing was submitted; {len(tasks)} task(s):")
            for t in tasks:
                print(f"#   {t.kind}: {t.weights} -> {t.output_dir}")
            return 0
        jobs = submit_eval(tasks, res, folder, chosen, args.array_parallelism, not args.no_check)
        manifest = {"kind": args.kind, "data": tasks[0].data, "tasks": []}
        for t, job in zip(tasks, jobs, strict=True):
            manifest["tasks"].append(
                {"checkpoint": t.weights, "output_dir": t.output_dir, "job_id": job.job_id}
            )
        write_json(root / MANIFEST, manifest)
        print(describe(jobs[0], res, f"{len(jobs)} {args.kind} evaluation(s)"))
        if len(jobs) > 1:
            first = str(jobs[0].job_id)
            pattern = str(jobs[0].paths.stdout).replace(first, first.rsplit("_", 1)[0] + "_<i>")
            print(f"  (array task i logs to {pattern})")
        if not args.wait:
            print(f"  results later: python -m launch.slurm_eval --collect {root}", flush=True)
            return 0
        rows, ok = gather(root, jobs)
        report(root, rows)
        return 0 if ok else 2
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
