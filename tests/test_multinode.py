"""Multi-node through torchrun's c10d rendezvous, on the loopback: two node agents of 2 processes each
form one group of 4 whose training equals a 4-process single-node run; an elastic restart after a worker
is SIGKILLed resumes from the checkpoint and ends where the uninterrupted run ends."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from dino_train.runtime.distributed import free_port
from tests.helpers import ENV, REPO, kill_tree, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.dist]

RANK_SCRIPT = str(REPO / "tests" / "elastic_rank.py")
# Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a restarted group can read the previous attempt's gloo
# addresses from the rendezvous store the agents share (pytorch/pytorch#135712): "connectFullMesh
# failed ... Connection refused". The README's elastic launch sets it too.
ELASTIC_ENV = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
STEPS = 4
# 4 processes on 2 cores: batch 2 per rank (8 per step, 5 steps per epoch), one thread each.
EXTRA = (
    "data.batch_size_per_gpu=2",
    "train.num_threads=1",
    f"train.max_steps={STEPS}",
    "train.checkpoint_every_steps=1",
)


def agent_cmd(nnodes: int, node_rank: int, nproc: int, endpoint: str, run_id: str, *args: str) -> list[str]:
    """One torchrun node agent joining the c10d rendezvous at ``endpoint`` (at most one restart)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        "--local-addr=127.0.0.1",
        "--max-restarts=1",
        "--monitor-interval=0.2",
        RANK_SCRIPT,
        *args,
    ]


def run_agents(nnodes: int, nproc: int, out: Path, data: Path, kill: tuple[int, int] = (0, 0)) -> list:
    """Start ``nnodes`` agents of ``nproc`` workers on this machine, wait for all; their CompletedProcess."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    args = (str(out), str(kill[0]), str(kill[1]), *tiny_overrides(data, out, *EXTRA))
    out.mkdir(parents=True)
    procs = [
        subprocess.Popen(
            agent_cmd(nnodes, node, nproc, endpoint, run_id, *args),
            cwd=REPO,
            env=ELASTIC_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(nnodes)
    ]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    return results


def dumps(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def assert_close_teachers(a: dict, b: dict, what: str) -> None:
    assert a["teacher"].keys() == b["teacher"].keys()
    for k in a["teacher"]:
        torch.testing.assert_close(a["teacher"][k], b["teacher"][k], rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")
    torch.testing.assert_close(a["center"], b["center"], rtol=1e-5, atol=1e-6, msg=f"{what}: center")


@pytest.fixture(scope="module")
def single_node(tiny_data, tmp_path_factory) -> list[dict]:
    """The reference: one agent of 4 processes."""
    out = tmp_path_factory.mktemp("one") / "run"
    (proc,) = run_agents(1, 4, out, tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dumps(out, 4)


def test_two_node_agents_form_one_group_equal_to_a_single_node_run(single_node, tiny_data, tmp_path):
    out = tmp_path / "two"
    procs = run_agents(2, 2, out, tiny_data)
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    ranks = dumps(out, 4)
    assert [r["world_size"] for r in ranks] == [4] * 4
    assert "4 process(es)" in procs[0].stdout + procs[1].stdout
    for r in range(4):
        assert ranks[r]["step"] == STEPS
        assert_close_teachers(ranks[0], ranks[r], f"rank {r} vs rank 0")
        assert_close_teachers(single_node[r], ranks[r], f"rank {r}: two agents vs one")
    assert not torch.equal(ranks[0]["center"], torch.zeros_like(ranks[0]["center"]))  # it trained


def test_elastic_restart_after_a_killed_worker_resumes_and_finishes(single_node, tiny_data, tmp_path):
    out = tmp_path / "elastic"
    procs = run_agents(2, 2, out, tiny_data, kill=(3, 3))  # rank 3 dies in its 3rd step
    logs = "\n".join(p.stdout + p.stderr for p in procs)
    for p in procs:
        assert p.returncode == 0, logs[-4000:]
    ranks = dumps(out, 4)
    killed = int((out / "killed").read_text())
    assert killed not in [r["pid"] for r in ranks]  # the ranks that finished are new processes
    assert "exitcode: -9" in logs and "resumed from" in logs, logs[-4000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 4
    for r in range(4):
        assert_close_teachers(single_node[r], ranks[r], f"rank {r}: restarted vs uninterrupted")
