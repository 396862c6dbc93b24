"""A real one-node SLURM cluster on this machine, for tests (see /work/shared/notes/local-slurm.md).

`local_slurm` (session fixture) installs Debian's SLURM when `slurmctld` is missing, writes
`/etc/slurm/slurm.conf` (fast scheduler, short credential expiry so a requeued job restarts in
~12 s, state/spool/logs under a temporary directory), starts munged, slurmctld and slurmd as plain
background processes, waits until the node is idle, and at teardown stops exactly the processes it
started (TERM, wait, KILL). Without root or packages it skips the test with the reason; with
``CI=true`` it fails instead, because CI must prove the SLURM path.

The conf file sits at the default path so that `scontrol requeue`, run by Lightning inside a job,
finds it. One cluster per machine at a time: a file lock serializes concurrent test sessions.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SLURM_CONF = Path("/etc/slurm/slurm.conf")
LOCK_FILE = Path("/tmp/lmtrain-local-slurm.lock")
PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a local SLURM (reason in the message)."""


def _run(cmd: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _install() -> None:
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurmctld is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            done = _run(cmd, timeout=300, env=env)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` timed out") from None
        if done.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")


def _slurm_conf(host: str, root: Path, cpus: int) -> str:
    return f"""\
# Written by tests/local_slurm.py for a throw-away test cluster.
ClusterName=lmtrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
KillWait=5
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _munge_works() -> bool:
    try:
        cred = _run(["munge", "-n"], timeout=5)
        return cred.returncode == 0 and _run(["unmunge"], input=cred.stdout, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class LocalSlurm:
    """A running test cluster: its directory, node name and the daemons this process started."""

    root: Path
    host: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _lock: object = None

    def start(self) -> LocalSlurm:
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local SLURM needs root (daemons, /etc/slurm, munge)")
        if shutil.which("slurmctld") is None or shutil.which("sbatch") is None or shutil.which("munged") is None:
            _install()
        self._lock = open(LOCK_FILE, "w")  # noqa: SIM115 - held until stop()
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SlurmUnavailable(f"another test session holds {LOCK_FILE} (its own cluster)") from None
                time.sleep(1)
        self.host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(_slurm_conf(self.host, self.root, os.cpu_count() or 1))
        self._start_munge()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D"])
        self._wait_idle(timeout=60)
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")  # noqa: SIM115 - the child owns it
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

    def _start_munge(self) -> None:
        if _munge_works():
            return  # a munged is already running (not ours: we leave it alone)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run(["mungekey", "--create"], timeout=30)
            shutil.chown(key, "munge", "munge")
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self._spawn("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                               "/usr/sbin/munged", "-F"])
        self._wait(_munge_works, 15, "munged did not start")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SlurmUnavailable(f"{what}; exited: {dead or 'none'}\n{self.logs()}")
            time.sleep(0.2)

    def node_state(self) -> str:
        try:
            return _run(["sinfo", "-h", "-o", "%t"], timeout=5).stdout.strip()
        except subprocess.TimeoutExpired:
            return ""

    def _wait_idle(self, timeout: float) -> None:
        self._wait(lambda: self.node_state() == "idle", timeout, f"node {self.host} not idle")

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stdout", "slurmd.stdout", "munged.stdout"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):  # reverse start order
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory: pytest.TempPathFactory):
    """A running local SLURM cluster (skips without root / packages; fails instead when CI=true)."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.TimeoutExpired) as e:
        cluster.stop()
        message = f"local SLURM unavailable: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    yield cluster
    cluster.stop()
