"""Slurm's variables -> rank, local rank, world size and master address, on environments of multi-node
jobs written down as Slurm sets them for one task of an ``srun`` step."""

from __future__ import annotations

import pytest

from dino_train.runtime.distributed import DistEnv, detect_env
from dino_train.runtime.slurm_env import SlurmEnvError, expand_nodelist, parse_tasks_per_node, slurm_layout

# sbatch --nodes=5 --ntasks-per-node=2; srun python ...: task 7 of 10, on the 4th node.
FIVE_NODES = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[001-004,010]",
    "SLURM_NODELIST": "gpu[001-004,010]",
    "SLURM_STEP_NODELIST": "gpu[001-004,010]",
    "SLURM_JOB_NUM_NODES": "5",
    "SLURM_NTASKS": "10",
    "SLURM_NPROCS": "10",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2(x5)",
    "SLURM_STEP_NUM_TASKS": "10",
    "SLURM_STEP_TASKS_PER_NODE": "2(x5)",
    "SLURM_PROCID": "7",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "3",
    "SLURMD_NODENAME": "gpu004",
}

# sbatch --ntasks=7 --nodes=2: Slurm puts 4 tasks on the first node, 3 on the second.
UNEVEN = {
    "SLURM_JOB_ID": "77",
    "SLURM_JOB_NODELIST": "node-[1-2]",
    "SLURM_STEP_NODELIST": "node-[1-2]",
    "SLURM_NTASKS": "7",
    "SLURM_TASKS_PER_NODE": "4,3",
    "SLURM_STEP_TASKS_PER_NODE": "4,3",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}

# Hosts of two name families; 2 tasks on each of the first two nodes, 1 on the last.
MIXED = {
    "SLURM_JOB_ID": "40001",
    "SLURM_JOB_NODELIST": "a01,b[02-03]",
    "SLURM_STEP_NODELIST": "a01,b[02-03]",
    "SLURM_NTASKS": "5",
    "SLURM_TASKS_PER_NODE": "2(x2),1",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
    "SLURM_PROCID": "4",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "2",
}

# A 4-node allocation whose srun step runs on the last two nodes only: the step's variables describe
# the group (the job-wide ones would put the master on a node the step does not use).
STEP_SUBSET = {
    "SLURM_JOB_ID": "9",
    "SLURM_JOB_NODELIST": "gpu[001-004]",
    "SLURM_STEP_NODELIST": "gpu[003-004]",
    "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "8(x4)",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
}

# An older Slurm (or a wrapper) that exports no LOCALID / NODEID / TASKS_PER_NODE: block order assumed.
SPARSE = {
    "SLURM_JOB_NODELIST": "rack[1-2]-n[08-09]",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_PROCID": "5",
}


@pytest.mark.parametrize(
    "env, expected",  # (rank, local rank, world size, node rank, master address, master port)
    [
        (FIVE_NODES, (7, 1, 10, 3, "gpu001", 23456)),  # port 20000 + job id % 20000
        (UNEVEN, (5, 1, 7, 1, "node-1", 20077)),
        (MIXED, (4, 0, 5, 2, "a01", 20001)),
        (STEP_SUBSET, (2, 0, 4, 1, "gpu003", 20009)),
        (SPARSE, (5, 1, 8, 2, "rack1-n08", 20000)),
    ],
    ids=["five-nodes", "uneven", "mixed-names", "step-subset", "sparse"],
)
def test_layout_of_recorded_multi_node_jobs(env, expected):
    got = slurm_layout(env)
    assert got is not None
    assert (
        got.rank,
        got.local_rank,
        got.world_size,
        got.node_rank,
        got.master_addr,
        got.master_port,
    ) == expected
    assert len(got.hosts) == len(got.tasks_per_node) and sum(got.tasks_per_node) == got.world_size


def test_every_task_of_a_job_gets_a_distinct_rank_and_the_same_master():
    # Derive the layout of all 5 tasks of MIXED, as each would see it without LOCALID / NODEID.
    seen = []
    for rank in range(5):
        env = {k: v for k, v in MIXED.items() if k not in ("SLURM_LOCALID", "SLURM_NODEID")}
        lay = slurm_layout({**env, "SLURM_PROCID": str(rank)})
        seen.append((lay.hosts[lay.node_rank], lay.local_rank, lay.master_addr))
    assert seen == [
        ("a01", 0, "a01"),
        ("a01", 1, "a01"),
        ("b02", 0, "a01"),
        ("b02", 1, "a01"),
        ("b03", 0, "a01"),
    ]


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
        ("node-[1-2]", ["node-1", "node-2"]),
        ("a01,b[02-03]", ["a01", "b02", "b03"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),  # no padding in the bound, none added
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # padding kept, then outgrown
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
        ("login.cluster.org", ["login.cluster.org"]),
        ("x[3],y1,z[1,5]", ["x3", "y1", "z1", "z5"]),
    ],
)
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_tasks_per_node_run_lengths():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    assert parse_tasks_per_node("4,3,1(x2)") == [4, 3, 1, 1]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"SLURM_STEP_NODELIST": "gpu[001-004"}, "unbalanced"),
        ({"SLURM_STEP_NODELIST": "gpu[004-001]"}, "runs backwards"),
        ({"SLURM_STEP_NODELIST": "gpu[a-b]"}, "'a-b' is not a number"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3)"}, "lists 3 node(s), the node list 5"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2[x5]"}, "is not N or N(xK)"),
        ({"SLURM_STEP_NUM_TASKS": "12"}, "12 tasks in SLURM_NTASKS but 10"),
        ({"SLURM_PROCID": "-1"}, "SLURM_PROCID='-1'"),
        ({"SLURM_PROCID": "10", "SLURM_LOCALID": "", "SLURM_NODEID": ""}, "outside the 10 task(s)"),
    ],
)
def test_bad_variables_are_named(change, words):
    with pytest.raises(SlurmEnvError) as info:
        slurm_layout({**FIVE_NODES, **change})
    assert words in str(info.value)


def test_detect_env_precedence():
    assert detect_env(FIVE_NODES) == DistEnv(7, 1, 10, "gpu001", 23456, "slurm")
    # srun torchrun ...: torchrun's agents form the group, their variables win.
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert detect_env({**FIVE_NODES, **torchrun}) == DistEnv(3, 1, 4, "h", 1, "torchrun")
    # One Slurm task trains alone; no Slurm at all is a single process too.
    one = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "gpu001", "SLURM_JOB_ID": "5"}
    assert detect_env(one) == DistEnv() == detect_env({})
    assert slurm_layout({}) is None
    assert detect_env({**FIVE_NODES, "MASTER_PORT": "29400"}).master_port == 29400
