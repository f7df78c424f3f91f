"""Slurm's environment -> this task's place in the job: a pure function of the variables, so it can be
tested on environments recorded from multi-node jobs.

Slurm describes a step with compressed lists: ``SLURM_STEP_NODELIST=gpu[001-004,010]`` (hosts, zero
padding kept), ``SLURM_STEP_TASKS_PER_NODE=2(x3),1`` (task counts, run-length encoded). Tasks are numbered
node by node under Slurm's default block distribution, and rank 0 runs on the first host of the step,
which is therefore the master address. The ``SLURM_STEP_*`` variables describe the ``srun`` step this
task belongs to, which may use fewer nodes or tasks than the job; the job-wide ones are the fallback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product

_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class SlurmEnvError(ValueError):
    """A Slurm variable that cannot be read or contradicts another; the message names it."""


@dataclass(frozen=True)
class SlurmLayout:
    rank: int  # SLURM_PROCID: this task among all tasks of the step
    local_rank: int  # this task among the tasks on its node
    world_size: int  # tasks in the step
    node_rank: int  # SLURM_NODEID: this task's node among the step's nodes
    hosts: tuple[str, ...]  # the step's nodes, in Slurm's order
    tasks_per_node: tuple[int, ...]  # tasks on each of ``hosts``
    master_addr: str  # the first host: where rank 0 runs
    master_port: int


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: ``a01,b[02-03]`` -> ``["a01", "b[02-03]"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise SlurmEnvError(f"node list {text!r}: unbalanced or nested brackets")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmEnvError(f"node list {text!r}: unbalanced brackets")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_ranges(spec: str, where: str) -> list[str]:
    """``001-004,010`` -> ``["001", "002", "003", "004", "010"]``: the width of the lower bound is kept."""
    out = []
    for item in spec.split(","):
        m = _RANGE.match(item.strip())
        if m is None:
            raise SlurmEnvError(f"node list {where!r}: {item!r} is not a number or a range a-b")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise SlurmEnvError(f"node list {where!r}: range {item!r} runs backwards")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a Slurm node list, in order: ``gpu[001-002,010],cpu1`` -> ``[gpu001, gpu002,
    gpu010, cpu1]``; several bracket groups in one name (``r[1-2]n[1-2]``) expand as their product."""
    hosts = []
    for entry in _split_top_level(nodelist.strip()):
        # Alternate literal text and bracket contents: "r[1-2]n[3]" -> ["r", "1-2", "n", "3", ""].
        pieces = re.split(r"\[([^\]]*)\]", entry)
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(c) for c in product(*choices))
    if not hosts:
        raise SlurmEnvError(f"node list {nodelist!r} names no host")
    return hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """Slurm's tasks-per-node list, one count per node: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for item in spec.split(","):
        m = _TASKS.match(item.strip())
        if m is None:
            raise SlurmEnvError(f"tasks per node {spec!r}: {item!r} is not N or N(xK)")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None


def _int(env: Mapping[str, str], *names: str) -> int | None:
    found = _first(env, *names)
    if found is None:
        return None
    name, value = found
    if not value.isdigit():
        raise SlurmEnvError(f"{name}={value!r} is not a non-negative integer")
    return int(value)


def _tasks_per_node(env: Mapping[str, str], n_nodes: int, world: int | None) -> list[int]:
    """Tasks on each node: the step's list, else the job's, else SLURM_NTASKS_PER_NODE on every node,
    else the tasks spread as evenly as Slurm's block distribution spreads them."""
    found = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if found is not None:
        counts = parse_tasks_per_node(found[1])
        if len(counts) != n_nodes:
            raise SlurmEnvError(
                f"{found[0]}={found[1]!r} lists {len(counts)} node(s), the node list {n_nodes}"
            )
        return counts
    per_node = _int(env, "SLURM_NTASKS_PER_NODE")
    if per_node is not None and world is None:
        return [per_node] * n_nodes
    if per_node is not None:  # the nodes filled in order, the last one possibly part-full
        return [max(min(per_node, world - i * per_node), 0) for i in range(n_nodes)]
    if world is None:
        raise SlurmEnvError("neither SLURM_NTASKS nor SLURM_(STEP_)TASKS_PER_NODE is set")
    base, extra = divmod(world, n_nodes)
    return [base + (i < extra) for i in range(n_nodes)]


def _node_and_local(rank: int, counts: list[int]) -> tuple[int, int]:
    """(node, rank on that node) of global ``rank`` when tasks fill the nodes in order (block)."""
    start = 0
    for node, n in enumerate(counts):
        if rank < start + n:
            return node, rank - start
        start += n
    raise SlurmEnvError(f"SLURM_PROCID={rank} is outside the {start} task(s) of the step")


def slurm_layout(env: Mapping[str, str], default_port: int = 20000) -> SlurmLayout | None:
    """This task's layout from Slurm's variables; None outside a Slurm task (no SLURM_PROCID).

    SLURM_LOCALID and SLURM_NODEID win where set (they hold under any distribution); without them the
    block distribution is assumed. The port is MASTER_PORT, else ``default_port + job id % 20000``
    so two jobs that share a node do not collide.
    """
    rank = _int(env, "SLURM_PROCID")
    if rank is None:
        return None
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    found = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = expand_nodelist(found[1]) if found is not None else ["127.0.0.1"]
    counts = _tasks_per_node(env, len(hosts), world)
    if world is None:
        world = sum(counts)
    elif world != sum(counts):
        raise SlurmEnvError(f"{world} tasks in SLURM_NTASKS but {sum(counts)} in the tasks per node {counts}")
    node, local = _node_and_local(rank, counts)
    node = node if _int(env, "SLURM_NODEID") is None else _int(env, "SLURM_NODEID")
    local = local if _int(env, "SLURM_LOCALID") is None else _int(env, "SLURM_LOCALID")
    port = _int(env, "MASTER_PORT")
    job = _int(env, "SLURM_JOB_ID", "SLURM_JOBID") or 0
    return SlurmLayout(
        rank=rank,
        local_rank=local,
        world_size=world,
        node_rank=node,
        hosts=tuple(hosts),
        tasks_per_node=tuple(counts),
        master_addr=hosts[0],
        master_port=port if port is not None else default_port + job % 20000,
    )
