"""launch/mpi/train.sh (mpiexec from the mpich wheel) and launch/local/train.sh (the DeepSpeed
launcher, CPU fallback) run the real trainer for a few ZeRO-3 updates with 2 processes."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from pyramidion_ds.checkpoint import CheckpointDir

from ds_helpers import BIN, ROOT, subprocess_env


def config(tmp_path, data_dir, max_update=2):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "debug"},
                "data": {"data": str(data_dir), "max_tokens": 2048, "num_workers": 0},
                "train": {
                    "save_dir": str(tmp_path / "run"),
                    "deepspeed_config": str(ROOT / "ds_configs/zero3_cpu.json"),
                    "lr": 2e-3,
                    "log_interval": 1,
                    "max_update": max_update,
                },
            }
        )
    )
    return path


def script_env(**extra):
    """A user's shell: the venv's bin on PATH (mpiexec of the mpich wheel), PYRAMIDION_PYTHON set."""
    env = subprocess_env()
    for name in ("NUM_GPUS", "NPROC", "MASTER_PORT", "MPIEXEC", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(PYRAMIDION_PYTHON=sys.executable, **extra)
    return env


def run_script(script, args, env, timeout=420):
    return subprocess.run(
        ["bash", str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def test_mpi_script_trains_two_ranks(synthetic_bin, tmp_path):
    cfg = config(tmp_path, synthetic_bin)
    proc = run_script("launch/mpi/train.sh", [cfg], script_env(NPROC="2"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert f"train.sh: 2 MPI ranks via mpiexec, {sys.executable}: {cfg}" in out
    log = (tmp_path / "run" / "train.log").read_text()
    assert "launcher=mpi world_size=2 rank=0" in log and "ZeRO-3" in log
    assert CheckpointDir(tmp_path / "run").latest_complete().update == 2


def test_mpi_script_without_mpiexec_says_so(tmp_path):
    proc = run_script("launch/mpi/train.sh", ["debug"], script_env(MPIEXEC="no-such-mpiexec"), timeout=30)
    assert proc.returncode == 2
    assert "'no-such-mpiexec' not found; put an MPI launcher on PATH" in proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="tests the CPU fallback (no GPU listed)")
def test_local_script_falls_back_to_cpu_processes(synthetic_bin, tmp_path):
    cfg = config(tmp_path, synthetic_bin)
    proc = run_script("launch/local/train.sh", [cfg], script_env(NPROC="2"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "train.sh: 2 processes on" in out
    # the pre-flight check says in one line what the run will do
    assert f"check passed: 2 ranks, ZeRO-3, start at update 0; data {synthetic_bin}: train " in out, out[-3000:]
    # nothing a user on a CPU machine reads as trouble: no GPU-probe warnings, no GPU ids, no hostfile
    # warning, no shared-memory op build (1-2 min on a machine's first run, then a line per rank)
    for noise in (
        "Setting accelerator to CPU",
        "CUDA_VISIBLE_DEVICES",
        "Unable to find hostfile",
        "shm_comm",
        "built successfully",
    ):
        assert noise not in out, f"{noise!r} in the output:\n{out[-3000:]}"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "world_size=2 rank=0" in log and "ZeRO-3" in log
    assert CheckpointDir(tmp_path / "run").latest_complete().update == 2


def test_sbatch_script_run_outside_slurm_says_so(tmp_path):
    proc = run_script("launch/slurm/train.sbatch", ["debug"], script_env(), timeout=30)
    assert proc.returncode == 2
    assert "SLURM_JOB_ID is not set: submit this script with sbatch" in proc.stderr


def test_bad_config_fails_before_the_launcher_in_one_line(synthetic_bin, tmp_path):
    """A typo in the config is found by the launching process in seconds: the DeepSpeed launcher and the
    ranks never start, and the error is printed once."""
    cfg = config(tmp_path, synthetic_bin)
    proc = run_script("launch/local/train.sh", [cfg, "--model.d_modle", "32"], script_env(NPROC="2"), timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("unknown config key 'model.d_modle'; did you mean 'model.d_model'?") == 1, out
    assert "processes on" not in out and not (tmp_path / "run").exists()


def test_an_error_every_rank_meets_is_printed_once(synthetic_bin, tmp_path):
    """Past the launch scripts' check (here: the DeepSpeed launcher started by hand), bad input is the same
    on every rank of a node: only the node's first process prints it."""
    cfg = config(tmp_path, synthetic_bin)
    env = script_env(DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--log_level",
            "error",
            "--module",
            "pyramidion_ds.cli.train",
            str(cfg),
            "--data.data",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("pyramidion-train: error: data.data:") == 1, out[-3000:]
