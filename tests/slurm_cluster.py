"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd on localhost.

Usage (the session fixture in ``tests/test_dispatch.py`` does this)::

    with SlurmCluster() as cluster:      # installs the Debian packages if missing, starts daemons
        os.environ["SLURM_CONF"] = str(cluster.conf)
        ...                              # sbatch / squeue / submitit talk to it

Or from a shell (``python tests/slurm_cluster.py up DIR`` prints the ``SLURM_CONF`` to
export; ``python tests/slurm_cluster.py down DIR`` stops it).

The cluster has one node (this machine, ``hostname -s``) in two partitions, ``cpu``
(default) and ``gpu``, with two fake GPUs (``Gres=gpu:2``, files that are symlinks to
``/dev/null``: real device files are not needed for scheduling, and count-only or
regular-file GRES drain the node). There is no slurmdbd: ``sacct`` does not work, so
every wait in the tests is bounded, and ``MinJobAge`` is long so that ``squeue
--states=all`` still reports finished jobs. ``MaxArraySize`` is small (4, so arrays
have at most 4 tasks) to exercise the dispatcher's array splitting. State, logs and
sockets live in one temporary folder; daemons are stopped by PID.

Measured on the 2-core test machine with the packages installed: start about 1 s,
a submitit round trip about 1-2 s (installing the packages first adds about 20 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
MAX_ARRAY_SIZE = 4
PARTITIONS = ("cpu", "gpu")
N_GPUS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """Install the SLURM and munge Debian packages when they are missing (CI machines)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("SLURM is not installed and cannot be installed here "
                           f"(needs root and apt-get): install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                   check=True, env=env, stdout=subprocess.DEVNULL)


class SlurmCluster:
    """Start and stop a one-node SLURM cluster whose state lives in ``folder``."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self._own_folder = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="toolkit-slurm-")).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ config
    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log", "dev"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        for i in range(N_GPUS):
            link = f / "dev" / f"gpu{i}"
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        key = f / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = f / "munge.socket"
        ctl_port, d_port = _free_port(), _free_port()
        cpus = os.cpu_count() or 2
        mem = 4096
        nodes = f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} Gres=gpu:{N_GPUS} State=UNKNOWN"
        parts = "\n".join(
            f"PartitionName={p} Nodes={self.node} Default={'YES' if i == 0 else 'NO'} "
            "MaxTime=INFINITE State=UP OverSubscribe=NO"
            for i, p in enumerate(PARTITIONS)
        )
        self.conf.write_text(f"""\
ClusterName=toolkit-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.pid'}
SlurmctldLogFile={f / 'log' / 'slurmctld.log'}
SlurmdLogFile={f / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
MaxArraySize={MAX_ARRAY_SIZE}
MinJobAge=3600
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
MessageTimeout=10
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MpiDefault=none
{nodes}
{parts}
""")
        (f / "gres.conf").write_text(
            f"NodeName={self.node} Name=gpu File={f / 'dev'}/gpu[0-{N_GPUS - 1}]\n")
        (f / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")

    # ------------------------------------------------------------------ life cycle
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.out", "ab")  # noqa: SIM115 (kept by the process)
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        """Write the configuration, start the daemons and wait until the node is idle."""
        ensure_installed()
        self._write_config()
        f = self.folder
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={f / 'munge.key'}", f"--pid-file={f / 'munged.pid'}",
                               f"--seed-file={f / 'munged.seed'}", f"--log-file={f / 'log' / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") > 0, timeout_s,
                   "slurmctld to answer")
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, timeout_s, "the node to become idle")
        return self

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=30)

    def _node_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
        return bool(out) and all(s.rstrip("*") in ("idle", "mixed", "allocated") for s in out)

    def _wait(self, ok: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                       f"{what}; logs in {self.folder / 'log'}")
            try:
                if ok():  # type: ignore[operator]
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                           f"logs in {self.folder / 'log'}")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (by PID, newest first)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run(["scancel", "--full", "--user", str(os.getuid())])
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main(argv: list[str]) -> int:
    """``up DIR``: start a cluster and print ``export SLURM_CONF=...``; ``down DIR``: stop it."""
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python tests/slurm_cluster.py up|down DIR", file=sys.stderr)
        return 2
    folder = Path(argv[1]).resolve()
    if argv[0] == "up":
        cluster = SlurmCluster(folder).start()
        (folder / "pids").write_text(" ".join(str(p.pid) for p in cluster.procs.values()))
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    for pid in (folder / "pids").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGTERM)  # each daemon leads its own session
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
