"""What a Slurm job asks for, in one place: command-line flags, checks that need no cluster, and the
parameters submitit's ``SlurmExecutor`` takes. Nothing here names a particular cluster: every partition,
account, QoS and constraint comes from the user."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field


class LaunchError(RuntimeError):
    """A launch that cannot go ahead; the message is one line naming the cause (the CLI exits with 2)."""


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(text: str) -> int:
    """A Slurm time limit in minutes: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.

    Seconds are rounded up, because submitit (and Slurm) count whole minutes."""
    m = _TIME.match(text.strip())
    if m is None:
        raise LaunchError(f"--time {text!r}: not a Slurm time (e.g. 72:00:00, 3-00:00:00 or 90 for minutes)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    minutes = -(-seconds // 60)
    if minutes <= 0:
        raise LaunchError(f"--time {text!r}: the time limit must be at least one minute")
    return minutes


def format_time(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{text}" if days else text


@dataclass
class SlurmResources:
    """One job's request. ``tasks_per_node`` None means one task per GPU (one per node without GPUs)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int = 10
    mem_gb: float | None = None  # per node; 0 asks for all of a node's memory, None leaves Slurm's default
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = None  # for clusters that want --gres=gpu:8 instead of --gpus-per-node
    exclude: str | None = None
    job_name: str = "dino"
    wckey: str | None = None  # submitit would send "submitit", which clusters without wckeys reject
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to write a checkpoint
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, conda activate)
    extra: dict[str, str] = field(default_factory=dict)  # any other #SBATCH option, name -> value

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def summary(self) -> str:
        parts = [
            f"{self.nodes} node(s) x {self.ntasks_per_node} task(s) x {self.cpus_per_task} CPU(s)",
            f"{self.gpus_per_node} GPU(s)/node",
        ]
        if self.mem_gb is not None:
            parts.append(f"mem {self.mem_gb:g} GB/node" if self.mem_gb else "all node memory")
        parts.append(f"time {format_time(self.time_min)}")
        parts.append(f"partition {self.partition or '(default)'}")
        return ", ".join(parts)


def check_resources(res: SlurmResources) -> None:
    """Reject requests that no cluster could run, before asking Slurm."""
    for name, value, low in (
        ("--nodes", res.nodes, 1),
        ("--tasks-per-node", res.ntasks_per_node, 1),
        ("--cpus-per-task", res.cpus_per_task, 1),
        ("--gpus-per-node", res.gpus_per_node, 0),
    ):
        if value < low:
            raise LaunchError(f"{name} {value}: must be at least {low}")
    if res.mem_gb is not None and res.mem_gb < 0:
        raise LaunchError(f"--mem-gb {res.mem_gb:g}: must be positive (0 asks for all of a node's memory)")
    if res.gpus_per_node and res.tasks_per_node not in (None, res.gpus_per_node):
        raise LaunchError(
            f"--tasks-per-node {res.tasks_per_node} with --gpus-per-node {res.gpus_per_node}: train() runs "
            "one process per GPU; leave --tasks-per-node out (it follows the GPUs) or make them equal"
        )
    if res.signal_delay_s >= res.time_min * 60:
        raise LaunchError(
            f"--signal-delay {res.signal_delay_s} s is not shorter than --time {format_time(res.time_min)}: "
            "the job would be asked to checkpoint before it starts"
        )
    if not res.job_name or any(c.isspace() for c in res.job_name):
        raise LaunchError(f"--job-name {res.job_name!r}: give a name without spaces")


def executor_parameters(res: SlurmResources, array_parallelism: int | None = None) -> dict:
    """Keyword arguments for ``SlurmExecutor.update_parameters`` (submitit's own names, not sbatch's)."""
    params: dict = {
        "job_name": res.job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.ntasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "time": res.time_min,
        "signal_delay_s": res.signal_delay_s,
        "wckey": res.wckey,
    }
    optional = {
        "gpus_per_node": res.gpus_per_node or None,
        "mem": None if res.mem_gb is None else _mem(res.mem_gb),
        "partition": res.partition,
        "account": res.account,
        "qos": res.qos,
        "constraint": res.constraint,
        "gres": res.gres,
        "exclude": res.exclude,
        "setup": list(res.setup) or None,
        "additional_parameters": dict(res.extra) or None,
        "array_parallelism": array_parallelism,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _mem(gb: float) -> str:
    return f"{int(gb)}G" if gb == int(gb) else f"{int(gb * 1024)}M"


def add_resource_args(p: argparse.ArgumentParser, job_name: str, cpus_per_task: int = 10) -> None:
    g = p.add_argument_group("Slurm resources (nothing is specific to one cluster)")
    g.add_argument("--nodes", type=int, default=1, help="machines")
    g.add_argument("--gpus-per-node", type=int, default=0, help="0 on CPU-only clusters")
    g.add_argument("--tasks-per-node", type=int, help="default: one per GPU, or 1 without GPUs")
    g.add_argument(
        "--cpus-per-task", type=int, default=cpus_per_task, help="data workers + 1 is a good start"
    )
    g.add_argument("--mem-gb", type=float, help="memory per node in GB (0: all of it); default: Slurm's")
    g.add_argument("--time", default="01:00:00", help="time limit: 72:00:00, 3-00:00:00 or minutes")
    g.add_argument("--partition", help="default: the cluster's default partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint", help="node features, e.g. volta32gb")
    g.add_argument("--gres", help="e.g. gpu:8, for clusters that do not take --gpus-per-node")
    g.add_argument("--exclude", help="nodes to avoid")
    g.add_argument("--job-name", default=job_name, help="the name squeue shows")
    g.add_argument("--wckey", help="only on clusters that use workload characterisation keys")
    g.add_argument("--signal-delay", type=int, default=120, help="seconds between USR2 and the time limit")
    g.add_argument("--setup", action="append", default=[], help="a shell line run before srun (repeatable)")
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option (repeatable)",
    )


def resources_from_args(args: argparse.Namespace) -> SlurmResources:
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key.strip("-"):
            raise LaunchError(f"--sbatch {item!r}: expected KEY=VALUE, e.g. --sbatch mail-type=END")
        extra[key.strip("-")] = value
    res = SlurmResources(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        time_min=parse_time(args.time),
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        gres=args.gres,
        exclude=args.exclude,
        job_name=args.job_name,
        wckey=args.wckey,
        signal_delay_s=args.signal_delay,
        setup=list(args.setup),
        extra=extra,
    )
    check_resources(res)
    return res
