"""launch/slurm/*.sbatch|sh on the real two-node SLURM of conftest.py: the real trainer, CPU, ZeRO-3.

Each job is `sbatch --nodes=2 --ntasks-per-node=1` of launch/slurm/train.sbatch (two ranks, one per
node, gloo) with the script's GPU defaults overridden on the command line (CPU_JOB), the debug model
and ds_configs/zero3_cpu.json, trained for a few updates on the synthetic corpus.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from pyramidion_ds.checkpoint import CheckpointDir, tag_for
from pyramidion_ds.checkpoint.weights import init_source

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
PRETRAIN_THEN_FINETUNE = REPO / "launch" / "slurm" / "pretrain_then_finetune.sh"
ZERO3_CPU = REPO / "ds_configs" / "zero3_cpu.json"
# The script's defaults are for GPU nodes (8 GPUs, 8 CPUs per task, 24 h); these CPU nodes have no
# GRES and 2 CPUs.
CPU_JOB = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10")
JOB_TIMEOUT = 420  # the first DeepSpeed launch on a machine JIT-builds an op (~1 min on 2 busy cores)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The synthetic corpus, binarized by the real pyramidion-preprocess (as tests/integration does)."""
    from pyramidion_ds.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("corpus")
    paths = write_corpus(root / "raw", {"train": 64, "valid": 8, "test": 8}, seed=0, min_words=150, max_words=250)
    files = ",".join(f"{split}={path}" for split, path in paths.items())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyramidion_ds.cli.preprocess",
            "--source-files",
            files,
            "--destdir",
            str(root / "bin"),
            "--spm-vocab-size",
            "256",
            "--workers",
            "1",
            "--max-source-positions",
            "512",
            "--max-target-positions",
            "128",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "bin"


@pytest.fixture
def job_env(slurm_cluster):
    """What a user exports before sbatch: the interpreter that has pyramidion_ds.

    DeepSpeed JIT-builds an op into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, shared by
    every environment of the user). Two venvs on one machine rebuild it over each other (minutes on
    2 busy cores), so these jobs get a directory of their own per interpreter.
    """
    env = dict(slurm_cluster.env, PYRAMIDION_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    if "TORCH_EXTENSIONS_DIR" not in env:
        key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        env["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"pyramidion-{key}")
    return env


def write_config(tmp_path: Path, name: str, data_dir: Path, save_dir: str | None = None, **sections) -> Path:
    cfg = {
        "model": {"preset": "debug"},
        "data": {"data": str(data_dir), "max_tokens": 2048, "num_workers": 0},
        "train": {
            "save_dir": save_dir or str(tmp_path / name),
            "deepspeed_config": str(ZERO3_CPU),
            "lr": 2e-3,
            "log_interval": 1,
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit_train(cluster, env, cwd: Path, *args, options=()) -> int:
    return cluster.sbatch(*CPU_JOB, *options, TRAIN_SBATCH, *map(str, args), env=env, cwd=cwd)


def job_log(cwd: Path, name: str, job_id: int) -> str:
    """The job's output file: %x-%j.out in the submission directory."""
    path = cwd / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def wait_until(cluster, job_id: int, condition, what: str, timeout: float = JOB_TIMEOUT, log=lambda: ""):
    """Poll `scontrol show job` until condition(info) holds; fail early if the job ended instead."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job(job_id)
        if condition(info):
            return info
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            pytest.fail(
                f"job {job_id} ended ({info.get('JobState')} {info.get('ExitCode')}) before {what}\n{log()[-6000:]}"
            )
        if time.monotonic() > deadline:
            cluster.run(["scancel", str(job_id)], check=False)
            pytest.fail(
                f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s waiting for {what}\n"
                f"{log()[-6000:]}\n{cluster.logs()}"
            )
        time.sleep(0.5)


def assert_completed(info: dict, log: str) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]


def assert_zero3_checkpoint(run_dir: Path, update: int, ranks: int = 2) -> None:
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == tag_for(update)
    shards = sorted(p.name for p in (ckpt / tag_for(update)).glob("zero_pp_rank_*"))
    expected = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(ranks) for kind in ("model", "optim")]
    assert shards == expected
    assert CheckpointDir(run_dir).latest_complete().update == update


def test_two_node_zero3_job_completes_and_a_second_submission_resumes(slurm_cluster, job_env, corpus, tmp_path):
    """A 2-node ZeRO-3 job completes; the same command submitted again on 1 node continues its run."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, "run", corpus)
    job_id = submit_train(slurm_cluster, job_env, tmp_path, config, "--train.max_update", "2")
    info = slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
    log = job_log(tmp_path, "pyramidion-train", job_id)
    assert_completed(info, log)
    assert info["NodeList"] == "node[1-2]"
    assert (
        f"train.sbatch: job {job_id} (restart 0) on node[1-2], {sys.executable}: {config} --train.max_update 2"
    ) in log
    assert "launcher=slurm world_size=2 rank=0 local_rank=0/1" in log
    assert "ZeRO-3" in log
    assert_zero3_checkpoint(run_dir, 2)

    # the same command with a larger max_update continues from the checkpoint, on 1 node of the 2 (issue
    # #25): the 2-rank ZeRO-3 checkpoint goes through DeepSpeed's universal format, with its optimizer
    # state and data position, at the same global batch (update_freq 1 -> 2)
    job2 = submit_train(slurm_cluster, job_env, tmp_path, config, "--train.max_update", "4", options=("--nodes=1",))
    info = slurm_cluster.wait_job(job2, timeout=JOB_TIMEOUT)
    log2 = job_log(tmp_path, "pyramidion-train", job2)
    assert_completed(info, log2)
    assert info["NodeList"] in ("node1", "node2"), info
    # the launch script's check-only says what the resume will do, before srun starts a task
    told = [line for line in log2.splitlines() if line.startswith("check passed: 1 rank, ZeRO-3, resume: ")]
    assert any(
        f"resume: {tag_for(2)} (update 2, 2 ranks, ZeRO-3) on another layout (2 ranks -> 1)" in line for line in told
    ), log2[-3000:]
    train_log = (run_dir / "train.log").read_text()
    assert "launcher=slurm world_size=1" in train_log
    assert "train.update_freq 1 -> 2: 1 ranks x 2 keep the checkpoint's global batch" in train_log
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(2)} at update 2" in train_log
    assert "train | update 3 " in train_log and "train | update 4 " in train_log
    assert_zero3_checkpoint(run_dir, 4, ranks=1)


def test_usr1_saves_requeues_and_the_requeued_job_resumes(slurm_cluster, job_env, corpus, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, "run", corpus, train={"max_update": 100000})
    job_id = submit_train(slurm_cluster, job_env, tmp_path, config)
    log = lambda: job_log(tmp_path, "pyramidion-train", job_id)  # noqa: E731
    wait_until(slurm_cluster, job_id, lambda _: "train | update 2 " in log(), "update 2 was logged", log=log)

    # What SLURM does 120 s before the time limit (--signal=USR1@120): without --batch, scancel
    # signals the job steps (the srun tasks), not the batch script.
    slurm_cluster.run(["scancel", "--signal=USR1", str(job_id)])
    # SLURM shows a requeued job PENDING with Reason=None for a moment before its BeginTime hold is set
    info = wait_until(
        slurm_cluster,
        job_id,
        lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING" and i["Reason"] != "None",
        "the job was requeued",
        timeout=120,
        log=log,
    )
    saved = CheckpointDir(run_dir).latest_complete()
    assert saved is not None and 2 <= saved.update < 100000
    assert f"received SIGUSR1: saved {tag_for(saved.update)} at update {saved.update}; exiting with code 75" in log()
    assert f"requeueing job {job_id}" in log()
    # SLURM 22.05 holds a requeued job back ~2 minutes (EligibleTime = requeue time + 121 s) ...
    assert info["Reason"] == "BeginTime"
    held = datetime.fromisoformat(info["EligibleTime"]) - datetime.fromisoformat(info["SubmitTime"])
    assert held.total_seconds() >= 60, info

    # ... which leaves time to shorten the run: the requeued job re-reads the same config path.
    config.write_text(config.read_text().replace("max_update: 100000", f"max_update: {saved.update + 2}"))
    # The hold lets the nodes clean up and the old run's job credential be revoked. A relaunch within
    # the same second as the requeue is refused (credential revoked) and the job FAILS: start it
    # early only once the nodes are idle again and a few seconds have passed.
    wait_until(slurm_cluster, job_id, lambda _: slurm_cluster.nodes_idle(), "the nodes were idle", timeout=60, log=log)
    time.sleep(max(0.0, 3 - (datetime.now() - datetime.fromisoformat(info["SubmitTime"])).total_seconds()))
    slurm_cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    info = slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
    assert_completed(info, log())
    assert info["Restarts"] == "1"
    assert f"train.sbatch: job {job_id} (restart 1)" in log()  # SLURM_RESTART_COUNT=1
    train_log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(saved.update)} at update {saved.update}" in train_log
    assert_zero3_checkpoint(run_dir, saved.update + 2)


def test_pretrain_then_finetune_with_dependency_and_init_from(slurm_cluster, job_env, corpus, tmp_path):
    # relative save_dirs: the jobs run in the submission directory
    write_config(tmp_path, "pre", corpus, save_dir="pre_run", data={"task": "denoising"}, train={"max_update": 2})
    # lr 1e-7: the fine-tuned weights must stay where --init-from put them (ZeRO-3's partitioned fp32
    # master copy must hold the loaded weights, or the first step puts the random initialisation back)
    write_config(
        tmp_path, "fine", corpus, save_dir="fine_run", train={"max_update": 2, "lr": 1e-7, "warmup_updates": 0}
    )
    proc = subprocess.run(
        [str(PRETRAIN_THEN_FINETUNE), "pre.yaml", "fine.yaml", *CPU_JOB],
        env=job_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    (pre_id, pre_dir), (fine_id,) = (
        re.search(r"pretraining job (\d+) -> (\S+)", proc.stdout).groups(),
        re.search(r"fine-tuning job (\d+)", proc.stdout).groups(),
    )
    pre_id, fine_id = int(pre_id), int(fine_id)
    assert pre_dir == str(tmp_path / "pre_run")
    assert slurm_cluster.job(fine_id)["Dependency"].startswith(f"afterok:{pre_id}")

    info = slurm_cluster.wait_job(pre_id, timeout=JOB_TIMEOUT)
    assert_completed(info, job_log(tmp_path, "pyramidion-pretrain", pre_id))
    assert "data: 64 train / 8 valid examples (denoising)" in (tmp_path / "pre_run" / "train.log").read_text()
    info = slurm_cluster.wait_job(fine_id, timeout=JOB_TIMEOUT)
    fine_log = job_log(tmp_path, "pyramidion-finetune", fine_id)
    assert_completed(info, fine_log)
    assert f"fine.yaml --init-from {pre_dir}" in fine_log
    train_log = (tmp_path / "fine_run" / "train.log").read_text()
    assert f"initialized weights from {pre_dir}" in train_log
    assert "(summarization)" in train_log
    assert_zero3_checkpoint(tmp_path / "fine_run", 2)
    before, after = (init_source(tmp_path / run).state_dict() for run in ("pre_run", "fine_run"))
    drift = max(float((after[name] - before[name]).abs().max()) for name in before)
    assert drift < 1e-4, f"weights moved by {drift} in 2 updates at lr 1e-7: the initialisation came back"


@pytest.mark.parametrize("case", ["missing config", "python without pyramidion_ds"])
def test_bad_input_fails_fast_naming_what_and_where(slurm_cluster, job_env, tmp_path, case):
    if case == "missing config":
        args, env = ["/nonexistent/run.yaml"], job_env
        message = f"config '/nonexistent/run.yaml' does not exist (working directory {tmp_path})"
    else:
        python = tmp_path / "python"  # an interpreter that exists but has no pyramidion_ds
        python.write_text('#!/bin/sh\nexec /usr/bin/env -i /usr/bin/python3 -I "$@"\n')
        python.chmod(0o755)
        args, env = ["debug"], dict(job_env, PYRAMIDION_PYTHON=str(python))
        message = f"'{python}' cannot import pyramidion_ds; set PYRAMIDION_PYTHON"
    job_id = submit_train(slurm_cluster, env, tmp_path, *args)
    info = slurm_cluster.wait_job(job_id, timeout=60)
    log = job_log(tmp_path, "pyramidion-train", job_id)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert f"train.sbatch: error: {message}" in log
    assert "on node node1 (host " in log  # the batch script runs on the first node
    assert "srun" not in log  # stopped before any task started


def test_master_port_in_use_stops_every_rank_at_once(slurm_cluster, job_env, corpus, tmp_path):
    """Rank 0 refuses a taken port before the rendezvous; --kill-on-bad-exit then stops rank 1, which
    would otherwise wait for the rendezvous timeout (30 min)."""
    config = write_config(tmp_path, "run", corpus, train={"max_update": 2})
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        job_id = submit_train(slurm_cluster, dict(job_env, MASTER_PORT=str(port)), tmp_path, config)
        info = slurm_cluster.wait_job(job_id, timeout=120)
    log = job_log(tmp_path, "pyramidion-train", job_id)
    assert info["JobState"] == "FAILED", log
    assert f"master port {port} (from MASTER_PORT) is already in use on" in log
    assert time.monotonic() - start < 100, log
    assert not (tmp_path / "run").exists()


def test_term_to_every_task_with_loader_workers_saves_and_requeues(slurm_cluster, job_env, corpus, tmp_path):
    """What SLURM does at a time limit or a preemption: SIGTERM to every process of the job's steps,
    the DataLoader workers included. The ranks save and exit 75 and the job is requeued."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, "run", corpus, data={"num_workers": 2}, train={"max_update": 100000})
    job_id = submit_train(slurm_cluster, job_env, tmp_path, config)
    log = lambda: job_log(tmp_path, "pyramidion-train", job_id)  # noqa: E731
    wait_until(slurm_cluster, job_id, lambda _: "train | update 2 " in log(), "update 2 was logged", log=log)
    slurm_cluster.run(["scancel", "--signal=TERM", str(job_id)])
    wait_until(
        slurm_cluster,
        job_id,
        lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING",
        "the job was requeued",
        timeout=120,
        log=log,
    )
    slurm_cluster.run(["scancel", str(job_id)])
    saved = CheckpointDir(run_dir).latest_complete()
    assert saved is not None and 2 <= saved.update < 100000
    assert f"received SIGTERM: saved {tag_for(saved.update)} at update {saved.update}; exiting with code 75" in log()
    assert "is killed by signal" not in log()
    assert f"requeueing job {job_id}" in log()
