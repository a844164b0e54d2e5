"""A real two-node SLURM cluster on this machine, for tests that submit jobs with sbatch/srun.

    munged (own key, socket, log)  ←  slurmctld -D -f slurm.conf  ←  slurmd -D -N node1 / -N node2

Both nodes have NodeAddr=127.0.0.1 and their own Port=; the settings are ones known
to work here (proctrack/linuxproc, task/none, select/cons_tres; SLURM 22.05 from Debian's
slurm-wlm). Everything (config, state, spool, logs, munge socket) lives in one tmp directory, so a
system SLURM, if any, is untouched. There is no slurmdbd: job states are read with `scontrol show
job` (completed jobs stay visible for MinJobAge seconds).

The `slurm_cluster` fixture is session-scoped; its finalizer cancels the jobs and stops every
daemon by the pid it started, also when a test (or the start-up itself) fails. Run this file
directly (`python tests/cluster/conftest.py`) to bring a cluster up by hand and print how to use it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
NODES = ("node1", "node2")
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def find_binary(name: str) -> str | None:
    """Like shutil.which, but also looks in the sbin directories a non-root PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_binaries() -> list[str]:
    return [name for name in SLURM_BINARIES if find_binary(name) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """Start/stop the daemons; submit jobs and wait for them. `env` is what a client needs."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # Variables of an enclosing SLURM job would confuse our clients and jobs.
        for name in list(self.env):
            if name.startswith("SLURM_") and name != "SLURM_CONF":
                del self.env[name]

    # ---------------------------------------------------------------- config

    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        cpus = max(1, os.cpu_count() or 1)  # each node claims the whole (shared) machine
        ctld_port = _free_port()
        node_lines = "\n".join(
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={name} Port={_free_port()} "
            f"CPUs={cpus} RealMemory=1000 State=UNKNOWN"
            for name in NODES
        )
        root = self.root
        self.conf.write_text(f"""\
# written by tests/cluster/conftest.py: two slurmd on one machine
ClusterName=pyramidiontest
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# keep finished jobs visible to `scontrol show job` (there is no accounting database)
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{node_lines}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    # ---------------------------------------------------------------- daemons

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        # Own session: a Ctrl-C in the terminal running pytest does not reach the daemons first.
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        munge = self.root / "munge"
        self._spawn(
            "munged",
            [
                find_binary("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket", timeout)
        self._spawn("slurmctld", [find_binary("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait_for(
            lambda: self.run(["scontrol", "ping"], check=False).returncode == 0,
            "slurmctld to answer `scontrol ping`",
            timeout,
        )
        for node in NODES:
            self._spawn(f"slurmd-{node}", [find_binary("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        self._wait_for(self._all_idle, "both nodes idle in sinfo", timeout)

    def nodes_idle(self) -> bool:
        """Both nodes idle: no job on them and none still completing (cleaning up)."""
        return self._all_idle()

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(node) == "idle" for node in NODES)

    def _wait_for(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n" + self.logs())
            if condition():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n" + self.logs())

    def stop(self) -> None:
        """Cancel jobs, then stop the daemons (slurmds first, munged last) by the pids we started."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user", str(os.getuid())], check=False, timeout=10)
            time.sleep(0.5)
        steps = self._slurmstepd_pids()
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for pid in steps:  # step daemons of jobs scancel could not reach
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()

    def _slurmstepd_pids(self) -> list[int]:
        """slurmstepd processes forked by our slurmds (they outlive their parent)."""
        ours = {str(p.pid) for n, p in self.procs.items() if n.startswith("slurmd")}
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # "pid (comm) state ppid pgrp session ..."
                comm, rest = stat.read_text().split("(", 1)[1].rsplit(")", 1)
            except (OSError, IndexError, ValueError):
                continue
            _state, ppid, _pgrp, session = rest.split()[:4]
            if comm.startswith("slurmstepd") and (ppid in ours or session in ours):
                pids.append(int(stat.parent.name))
        return pids

    def logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---------------------------------------------------------------- clients

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        argv = [find_binary(argv[0]) or argv[0], *argv[1:]]
        kwargs.setdefault("env", self.env)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> int:
        """Submit; returns the job id. `args` are sbatch's (options, then the script and its args)."""
        out = self.run(["sbatch", "--parsable", *map(str, args)], env=env or self.env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            if time.monotonic() > deadline:
                self.run(["scancel", str(job_id)], check=False)
                raise TimeoutError(
                    f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                    f"(reason {info.get('Reason')})\n" + self.logs()
                )
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM/munge not installed (missing {', '.join(missing)}); run .ci/install_slurm.sh")
    # Short path: the munge socket path must fit in a unix socket address (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="pyr-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("PYRAMIDION_KEEP_SLURM_DIR"):
            print(f"slurm cluster files kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    """Manual use: bring the cluster up, print the SLURM_CONF to export, stop on Enter or Ctrl-C.

    With stdin not a terminal (started in the background), it stays up until SIGTERM or SIGINT.
    """
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="pyr-slurm-")))

    def stop_on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        cluster.start()
        print(
            f"export SLURM_CONF={cluster.conf}\n"
            f"two nodes (node1, node2), partition debug; files and daemon logs in {cluster.root}",
            flush=True,
        )
        if sys.stdin.isatty():
            print("(press Enter or Ctrl-C to stop)", flush=True)
            input()
        else:
            print(f"(stop with: kill {os.getpid()})", flush=True)
            signal.pause()
    except (KeyboardInterrupt, EOFError):
        pass
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        print("slurm cluster stopped", flush=True)


if __name__ == "__main__":
    main()
