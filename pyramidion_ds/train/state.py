"""Per-rank state a resume must restore exactly: RNG streams, and the stop flags every rank agrees on.

Stop signals and launchers, as the loop sees them::

    SIGTERM / SIGUSR1 / SIGINT to the whole process group (SLURM, timeout, launch/local/train.sh)
        rank main process   PreemptionFlag records it; the loop finishes the update, saves, exits 75
        DataLoader workers  ignore it (ignore_stop_signals): the rank shuts them down itself, so a
                            worker killed by the signal can no longer take the rank down before it saves
    the launcher dies (kill -9, node agent gone)
        LauncherWatchdog    notices within a second and ends the rank without saving (its peers may be
                            gone too, so a collective save could hang); the latest complete checkpoint
                            is untouched, only a half-written newer one may be left (resume skips it)
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading

import numpy as np
import torch

log = logging.getLogger(__name__)

#: the pid of the process that launched this job's ranks (set by launch/local/train.sh); when it is gone
#: the ranks stop, like when their direct parent (the DeepSpeed launcher, torchrun) is gone
LAUNCHER_PID_ENV = "PYRAMIDION_LAUNCHER_PID"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (what SLURM sends before preemption or the time limit).

    The handler only records the request; the loop finishes the current update, saves a checkpoint and
    exits with the "preempted" code, so the launcher can requeue and the next run resumes.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals; their rank decides and stops them.

    SLURM and ``timeout`` signal every process of a job step. A worker that dies of SIGTERM makes torch
    raise "DataLoader worker (pid ...) is killed by signal" in the rank, which then exits without saving.
    """
    for sig in (*PreemptionFlag.SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this host (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LauncherWatchdog:
    """Ends this rank when its launcher is gone.

    Watched: the parent process when a launcher started us (DeepSpeed's ``launch``, torchrun: the
    parent pid changes when it dies and we are re-parented), and the pid in ``PYRAMIDION_LAUNCHER_PID``
    (launch/local/train.sh). Not armed for a process a user started by hand. Without its launcher a
    rank would go on writing to ``save_dir`` while nobody collects its exit code, and a restarted job
    would run beside it. The rank stops without saving: the other ranks may be gone too, so a
    collective save could hang; what it loses is the work since the latest complete checkpoint.
    ``on_gone(reason)`` runs in the watchdog thread and must end the process (``os._exit``).
    """

    def __init__(self, watch_parent: bool, on_gone, interval: float = 0.5, env=os.environ):
        self.parent = os.getppid() if watch_parent else None
        pid = env.get(LAUNCHER_PID_ENV, "")
        self.launcher = int(pid) if pid.isdigit() and int(pid) != os.getpid() else None
        self.on_gone, self.interval = on_gone, interval
        self._stop = threading.Event()
        self._thread = None

    @property
    def armed(self) -> bool:
        return self.parent is not None or self.launcher is not None

    def gone(self) -> str | None:
        """Why the launcher counts as gone, or None while it runs."""
        if self.parent is not None and os.getppid() != self.parent:
            return f"its launcher (parent pid {self.parent}) is gone"
        if self.launcher is not None and not pid_alive(self.launcher):
            return f"its launcher (pid {self.launcher}, {LAUNCHER_PID_ENV}) is gone"
        return None

    def start(self) -> "LauncherWatchdog":
        if self.armed and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="launcher-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            reason = self.gone()
            if reason is not None:
                self.on_gone(reason)
                return
