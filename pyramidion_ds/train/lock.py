"""One trainer per run directory: ``SAVE_DIR/.lock``, held by rank 0 from before its first write to exit.

Two jobs writing one ``save_dir`` (a requeue next to a run that did not stop, the same command twice)
interleave checkpoints and ``latest``. Rank 0 takes the lock right after the input checks and before
it writes anything; a second trainer is refused with one line naming the holder::

    train.save_dir '/runs/x' is in use by another trainer: host gpu017, pid 48213, since 2026-11-30 14:02:11 UTC ...

How it is held: ``fcntl.flock`` on the file, which the kernel (or the file server) releases when the
holding process ends, however it ends; the file's text (host, pid, start time) only names the holder
in messages. Local filesystems, NFSv4 and Lustre mounted with ``-o flock`` lock across hosts.
Where flock is not supported (Lustre without ``flock``/``localflock``, some NFSv3 setups: the call
fails with ENOLCK or EOPNOTSUPP) the text decides: a holder on this host whose pid is gone is stale
and taken over; a holder on another host cannot be checked from here and is refused unless
``train.force_unlock`` is set (make sure that job is gone first). Lustre's ``localflock`` locks per node
only: two jobs on different nodes would both get the lock, so use ``flock`` there.

A lock left by a trainer that died (kill -9, node crash) is taken over with a warning naming it.
On a clean exit the text is cleared before the lock is released.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from .state import pid_alive

LOCK_NAME = ".lock"
#: flock raises these where the filesystem cannot lock (the text-only rule applies then)
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirLocked(Exception):
    """Another live trainer holds the run directory (the message names host and pid)."""


def _holder_text(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {since}"


class RunDirLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.flock = True
        #: the warning of a stale lock taken over (None otherwise), for the run's train.log once it is open
        self.taken_over: str | None = None

    def _read(self) -> dict:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def acquire(self, force: bool = False, warn=None) -> "RunDirLock":
        """Take the lock or raise :class:`RunDirLocked`. A stale lock taken over leaves one line in
        :attr:`taken_over` (and to ``warn``, if given)."""
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(self._refusal(self._read(), "it holds the lock")) from None
        except OSError as err:
            if err.errno not in NO_FLOCK:
                os.close(fd)
                raise
            self.flock = False
        holder = self._read()
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        someone_else = (holder.get("host"), holder.get("pid")) != (me["host"], me["pid"])
        if holder and holder.get("pid") is not None and someone_else:
            if not self.flock and not force:
                same_host = holder.get("host") == me["host"]
                if not same_host or pid_alive(int(holder["pid"])):
                    os.close(fd)
                    why = (
                        "it is alive"
                        if same_host
                        else "this filesystem has no flock, so a holder on another host cannot be checked; "
                        "if that job is gone, set train.force_unlock true"
                    )
                    raise RunDirLocked(self._refusal(holder, why))
            self.taken_over = (
                f"taking over the lock of {self.run_dir} left by a trainer that is gone ({_holder_text(holder)})"
                + ("" if self.flock else "; this filesystem does not support flock")
            )
            if warn is not None:
                warn(self.taken_over)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _refusal(self, holder: dict, why: str) -> str:
        return (
            f"train.save_dir '{self.run_dir}' is in use by another trainer: {_holder_text(holder)} ({why}); "
            f"stop that run or choose another save_dir"
        )

    def release(self) -> None:
        """Clear the text, then let go (closing the file releases the flock)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
