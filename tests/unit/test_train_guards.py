"""The run-dir lock, the launcher watchdog, stop signals in loader workers, the shipped bf16 JSONs."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pyramidion_ds.train.lock import RunDirLock, RunDirLocked
from pyramidion_ds.train.state import LAUNCHER_PID_ENV, LauncherWatchdog, ignore_stop_signals

ROOT = Path(__file__).resolve().parents[2]


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding run_dir's lock until killed."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
        f"from pyramidion_ds.train.lock import RunDirLock\n"
        f"RunDirLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_refused_naming_host_and_pid(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunDirLocked) as err:
            RunDirLock(tmp_path / "run").acquire()
        assert (
            f"train.save_dir '{tmp_path / 'run'}' is in use by another trainer: host {socket.gethostname()}, "
            f"pid {holder.pid}, since "
        ) in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_warning_and_cleared_on_release(tmp_path):
    holder = hold_lock(tmp_path / "run")
    holder.kill()  # dies holding it: the kernel drops the flock, the text stays
    holder.wait()
    warnings = []
    lock = RunDirLock(tmp_path / "run").acquire(warn=warnings.append)
    assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0] and "gone" in warnings[0]
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "run" / ".lock").read_text() == ""
    warnings.clear()
    RunDirLock(tmp_path / "run").acquire(warn=warnings.append).release()  # a clean release leaves no warning
    assert warnings == []


def test_without_flock_the_text_decides(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # a filesystem that cannot lock (Lustre without flock)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"host": "gpu017", "pid": 4242, "started": 0}))
    with pytest.raises(RunDirLocked, match="host gpu017, pid 4242, .*set train.force_unlock true"):
        RunDirLock(run_dir).acquire()
    warnings = []
    RunDirLock(run_dir).acquire(force=True, warn=warnings.append).release()
    assert "gpu017" in warnings[0]
    sleeper = subprocess.Popen(["sleep", "60"])
    try:  # same host: a live pid holds it, a dead one does not
        (run_dir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(RunDirLocked, match="it is alive"):
            RunDirLock(run_dir).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    RunDirLock(run_dir).acquire(warn=warnings.append).release()


def test_watchdog_ends_the_rank_when_the_launcher_pid_is_gone(tmp_path):
    launcher = subprocess.Popen(["sleep", "60"])
    code = textwrap.dedent(f"""
        import os, sys, time; sys.path.insert(0, {str(ROOT)!r})
        from pyramidion_ds.train.state import LauncherWatchdog
        LauncherWatchdog(False, lambda reason: (print(reason, flush=True), os._exit(7)), interval=0.1).start()
        print("watching", flush=True); time.sleep(60)""")
    rank = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **{LAUNCHER_PID_ENV: str(launcher.pid)}),
    )
    assert rank.stdout.readline().strip() == "watching"
    launcher.kill()
    launcher.wait()
    assert rank.wait(timeout=10) == 7
    assert rank.stdout.read().strip() == f"its launcher (pid {launcher.pid}, {LAUNCHER_PID_ENV}) is gone"


def test_watchdog_is_not_armed_for_a_process_started_by_hand():
    assert not LauncherWatchdog(False, None, env={}).armed
    assert LauncherWatchdog(True, None, env={}).armed


def test_loader_workers_ignore_the_stop_signals():
    import torch

    loader = torch.utils.data.DataLoader(
        range(4), batch_size=1, num_workers=1, worker_init_fn=ignore_stop_signals, multiprocessing_context="fork"
    )
    it = iter(loader)
    next(it)
    worker = it._workers[0]
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(worker.pid, sig)
    time.sleep(0.5)
    assert worker.is_alive() and [int(b) for b in it] == [1, 2, 3]


def test_shipped_bf16_configs_leave_the_overflow_scan_to_the_trainer():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        bf16 = json.loads(path.read_text()).get("bf16", {})
        if bf16.get("enabled") in (True, "auto"):
            assert bf16.get("check_grad_overflow") is False, path.name
