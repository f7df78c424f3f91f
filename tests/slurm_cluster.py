"""A real one-node Slurm (with accounting) for the tests, private to one test session.

Every daemon (munged, MariaDB, slurmdbd, slurmctld, slurmd) gets its own folder, socket, pid file and
ports, so two sessions on one machine, or a system Slurm, do not interfere. Clients find the cluster
through ``SLURM_CONF``. Needs root and Debian's packages (installed with apt-get when missing).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "slurm"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct"]


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message is the exact cause."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


def ensure_installed() -> None:
    """Install the Debian packages when a binary is missing (root with apt-get only)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed, and installing needs root with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], timeout=300, env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], timeout=600, env=env)
    still = [b for b in BINARIES if shutil.which(b) is None]
    if still:
        raise SlurmUnavailable(f"apt-get installed the packages but {', '.join(still)} is still missing")


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            # Below the machine's total: slurmd drains a node whose configured memory exceeds what it sees.
            return int(line.split()[1]) // 1024 - 512
    return 1024


@dataclass
class LocalSlurm:
    root: Path
    partition: str = "debug"
    cluster: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:8])
    started: list[str] = field(default_factory=list)  # daemon names, in start order
    children: dict[str, subprocess.Popen] = field(default_factory=dict)  # daemons we must reap ourselves

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def cmd(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def log(self, daemon: str) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------------------------------ start

    def start(self, timeout: float = 90) -> None:
        for sub in ("etc", "run", "log", "state", "spool", "munge", "db"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses sockets in folders others cannot traverse.
        for d in (self.root, self.root / "munge"):
            d.chmod(0o755)
        values = {
            "cluster": self.cluster,
            "root": str(self.root),
            "partition": self.partition,
            "munge_socket": str(self.root / "munge" / "munge.sock"),
            "ctld_port": _free_port(),
            "slurmd_port": _free_port(),
            "dbd_port": _free_port(),
            "db_port": _free_port(),
            "cpus": os.cpu_count() or 1,
            "memory_mb": _memory_mb(),
        }
        for name in ("slurm.conf", "slurmdbd.conf"):
            text = (TEMPLATES / f"{name}.in").read_text().format(**values)
            (self.root / "etc" / name).write_text(text)
        (self.root / "etc" / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a readable config
        self._start_munge(values["munge_socket"])
        self._start_mariadb(int(values["db_port"]))
        self._daemon("slurmdbd", ["slurmdbd"], ready=lambda: self._port_open(int(values["dbd_port"])))
        self._daemon("slurmctld", ["slurmctld"], ready=lambda: self._port_open(int(values["ctld_port"])))
        self._daemon("slurmd", ["slurmd", "-N", "localhost"], ready=lambda: True)
        self._wait_idle(timeout)

    def _start_munge(self, sock: str) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        m = self.root / "munge"
        args = [f"--key-file={key}", f"--socket={sock}", f"--pid-file={self.pid_file('munged')}"]
        args += [f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"]
        self._daemon("munged", ["munged", "--force", *args], ready=lambda: Path(sock).exists())

    def _start_mariadb(self, port: int) -> None:
        data = self.root / "db" / "data"
        _run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root"]
            + ["--auth-root-authentication-method=normal", "--skip-test-db"],
            timeout=180,
        )
        log = self.root / "log" / "mariadb.log"
        args = ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root", f"--port={port}"]
        args += ["--bind-address=127.0.0.1", f"--socket={self.root / 'db' / 'mysqld.sock'}"]
        # Only slurmdbd connects, from this machine; skipping the grant tables spares creating a user.
        args += ["--skip-grant-tables", "--skip-name-resolve", "--innodb-buffer-pool-size=32M"]
        args += [f"--pid-file={self.pid_file('mariadb')}", f"--log-error={log}"]
        with open(self.root / "log" / "mariadb.out", "ab") as out:
            self.children["mariadb"] = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
        self.started.append("mariadb")
        self._wait(lambda: self._port_open(port), 60, "mariadb", log)

    def _daemon(self, name: str, args: list[str], ready: Callable[[], bool]) -> None:
        env = self.env
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        if proc.returncode != 0:
            why = f"{proc.stderr.strip()} {self.log(name)[-500:]}"
            raise SlurmUnavailable(f"{name} did not start (exit {proc.returncode}): {why}")
        self.started.append(name)
        self._wait(ready, 30, name, self.root / "log" / f"{name}.log")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _wait(self, ready: Callable[[], bool], timeout: float, name: str, log: Path) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            time.sleep(0.2)
        tail = log.read_text(errors="replace")[-800:] if log.exists() else "(no log)"
        raise SlurmUnavailable(f"{name} not ready after {timeout:.0f} s; log tail: {tail}")

    def _wait_idle(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            proc = self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False)
            state = (proc.stdout or proc.stderr).strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise SlurmUnavailable(
            f"node not idle after {timeout:.0f} s (sinfo: {state!r}); slurmd log: {self.log('slurmd')[-600:]}"
        )

    # ------------------------------------------------------------------------------------------- stop

    def stop(self, timeout: float = 60) -> None:
        """Cancel jobs, wait for an empty queue (stopping slurmd under a running step orphans it), then
        stop slurmd, then the other daemons together, by their pid files."""
        if "slurmctld" in self.started:
            self.cmd("scancel", "--full", "-u", "root", check=False)
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                proc = self.cmd("squeue", "-h", "-o", "%i", check=False)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.5)
        first = [n for n in self.started if n == "slurmd"]
        for wave in (first, [n for n in reversed(self.started) if n not in first]):
            self._wait_gone({name: self._terminate(name) for name in wave})
        self.started.clear()
        if not os.environ.get("DINO_KEEP_SLURM"):  # set it to read the daemons' logs after a failure
            shutil.rmtree(self.root, ignore_errors=True)

    def _terminate(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text().split()[0])
            os.kill(pid, 15)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def _wait_gone(self, pids: dict[str, int | None], timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        for name, pid in pids.items():
            child = self.children.pop(name, None)
            if child is not None:  # our own child: wait() reaps it, where kill(pid, 0) would see a zombie
                try:
                    child.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                continue
            while pid is not None and time.monotonic() < end:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                if pid is not None:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass


def start_cluster() -> LocalSlurm:
    """Install if needed and start a private cluster; raises SlurmUnavailable with the exact cause."""
    ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="dino-slurm-"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
