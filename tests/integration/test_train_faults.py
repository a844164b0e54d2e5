"""Faults a cluster brings, through the real DeepSpeed launcher on CPU: a job-wide stop signal with
DataLoader workers on, a launcher killed with -9, a second trainer on a held save_dir, NaN gradients."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pyramidion_ds.checkpoint import CheckpointDir, tag_for
from pyramidion_ds.errors import EXIT_PREEMPTED

from ds_helpers import BIN, ROOT, free_port, run_deepspeed, subprocess_env, tensorboard_scalars
from test_train_lifecycle import config, train_single

TRAIN_SH = ROOT / "launch" / "local" / "train.sh"


def start(cmd, env=None):
    """A job in a process group of its own, as SLURM or `timeout` would see it; output to a pipe."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env or subprocess_env(),
        start_new_session=True,
    )


def read_until(proc, marker, output, timeout=600):
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        output.append(line)
        if marker in line:
            return
        assert time.monotonic() < deadline, "".join(output)[-3000:]
    pytest.fail(f"exited {proc.wait()} before {marker!r}\n" + "".join(output)[-4000:])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_job_wide_signal_with_workers_saves_and_the_job_exits_75(synthetic_bin, tmp_path, sig):
    """SIGUSR1 to train.sh's process group (as `timeout` and SLURM send it); SIGTERM to every process of the
    job at once (a cgroup-wide kill, a container stop): train.sh, the DeepSpeed launcher, ranks, loader
    workers. The launcher dies of it at once; train.sh waits for the saving ranks and returns their 75."""
    cfg = config(tmp_path, "run", synthetic_bin, data={"num_workers": 2}, train={"max_update": 400})
    env = dict(subprocess_env(), NPROC="2", PYRAMIDION_PYTHON=sys.executable)
    proc = start([str(TRAIN_SH), cfg], env)
    output = []
    read_until(proc, "train | update 3 ", output)
    if sig == signal.SIGTERM:
        job = psutil.Process(proc.pid)
        for process in [job, *job.children(recursive=True)]:
            process.send_signal(sig)
    else:
        os.killpg(proc.pid, sig)
    output.extend(proc.stdout)
    assert proc.wait(timeout=180) == EXIT_PREEMPTED, "".join(output)[-4000:]
    text = "".join(output)
    assert "is killed by signal" not in text
    info = CheckpointDir(tmp_path / "run").latest_complete()
    assert info is not None and 3 <= info.update < 400
    assert f"saved {tag_for(info.update)} at update {info.update}; exiting with code 75" in text
    if sig == signal.SIGTERM:  # the same command resumes where the signal stopped it
        run_deepspeed([cfg, "--train.max_update", str(info.update + 1)])
        assert max(tensorboard_scalars(tmp_path / "run" / "tensorboard", "train/loss")) == info.update + 1


def test_ranks_stop_without_saving_when_their_launcher_is_killed(synthetic_bin, tmp_path):
    cfg = config(
        tmp_path,
        "run",
        synthetic_bin,
        train={"max_update": 100000, "save_interval_updates": 1, "keep_last_checkpoints": 0},
    )
    proc = start([str(TRAIN_SH), cfg], dict(subprocess_env(), NPROC="2", PYRAMIDION_PYTHON=sys.executable))
    output = []
    read_until(proc, "train | update 3 ", output)
    launch = next(
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "deepspeed.launcher.launch" in " ".join(p.cmdline())
    )
    ranks = launch.children()
    assert len(ranks) == 2
    launch.kill()
    _, alive = psutil.wait_procs(ranks, timeout=20)
    for rank in alive:  # do not leave orphans training when this fails
        rank.kill()
    assert not alive, "ranks still running 20 s after their launcher died\n" + "".join(output)[-3000:]
    tags = CheckpointDir(tmp_path / "run").tags()
    time.sleep(3)
    assert CheckpointDir(tmp_path / "run").tags() == tags  # nothing written after they stopped
    assert CheckpointDir(tmp_path / "run").latest_complete() is not None
    output.extend(proc.stdout)
    # DeepSpeed's runner reports a launcher killed by a signal as success; train.sh reads rank 0's code
    assert proc.wait(timeout=60) == 1, "".join(output)[-3000:]
    assert "train.sh: the launcher reported success but rank 0 exited with 1\n" in "".join(output)
    assert "its launcher (parent pid" in "".join(output) and "exiting without saving" in "".join(output)


def test_second_trainer_on_a_held_save_dir_is_refused_before_writing(synthetic_bin, tmp_path):
    cfg = config(tmp_path, "run", synthetic_bin, train={"max_update": 100000})
    first = start([sys.executable, "-m", "pyramidion_ds.cli.train", cfg])
    output = []
    read_until(first, "train | update 1 ", output)
    run_dir = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log"}
    log_before = (run_dir / "train.log").read_text()
    second = train_single([cfg, "--train.max_update", "2"])
    assert second.returncode == 2, second.stderr[-3000:]
    message = second.stderr.strip().splitlines()[-1]
    assert f"train.save_dir '{run_dir}' is in use by another trainer: host " in message
    assert f"pid {first.pid}," in message
    touched = [
        p
        for p, mtime in before.items()
        if p.exists()
        and p.stat().st_mtime_ns != mtime
        and "checkpoints" not in p.parts
        and "tensorboard" not in p.parts
    ]
    assert touched == [], touched  # the second trainer wrote nothing (.lock, config.yaml, spm.model, ...)
    assert "distributed:" not in (run_dir / "train.log").read_text()[len(log_before) :]
    first.send_signal(signal.SIGUSR1)
    output.extend(first.stdout)
    assert first.wait(timeout=120) == EXIT_PREEMPTED, "".join(output)[-3000:]
    assert (run_dir / ".lock").read_text() == ""  # released


@pytest.mark.parametrize(
    "ds_config, precision",
    [
        ("zero2_cpu.json", "bf16"),  # check_grad_overflow off: DeepSpeed alone would apply the NaN update
        ("zero3_cpu.json", "fp32"),  # DeepSpeed skips it too, but the trainer used to count it as an update
    ],
)
def test_nan_gradient_on_one_rank_skips_the_update_on_all(synthetic_bin, tmp_path, ds_config, precision):
    # attempt 1 trains (update 1), attempt 2 is poisoned on rank 1 only: skipped everywhere, nothing
    # moves; attempt 3 trains (update 2); attempts 4-6 are poisoned: three in a row stop the run
    cfg = config(
        tmp_path,
        "run",
        synthetic_bin,
        train={
            "max_update": 20,
            "save_interval_updates": 1,
            "max_nonfinite_steps": 3,
            "update_freq": 2,
            "deepspeed_config": str(ROOT / "ds_configs" / ds_config),
            "precision": precision,
        },
    )
    report = tmp_path / "report"
    env = dict(subprocess_env(), NAN_GRAD_ATTEMPTS="2,4,5,6", NAN_GRAD_RANK="1", NAN_GRAD_REPORT=str(report))
    proc = subprocess.run(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            str(ROOT / "tests" / "integration" / "nan_grad_train.py"),
            cfg,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    for rank in (0, 1):
        results = json.loads((report / f"rank{rank}.json").read_text())
        assert set(results) == {"2", "4", "5", "6"}, results
        for attempt, result in results.items():
            assert result["skipped"] == "gradients" and result["unchanged"], (rank, attempt, result)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "non-finite gradients at update 2; update skipped (1/3)" in log
    assert "non-finite gradients at update 3; update skipped (3/3)" in log
    assert (
        "non-finite loss or gradients for 3 consecutive updates at update 3; stopping without saving "
        f"(latest complete checkpoint: {tag_for(2)})"
    ) in out
    assert sorted(tensorboard_scalars(tmp_path / "run" / "tensorboard", "train/loss")) == [1, 2]
    assert CheckpointDir(tmp_path / "run").latest_complete().update == 2
