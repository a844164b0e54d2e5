"""Rank discovery under each local launcher: mpiexec (mpich wheel), the deepspeed launcher (CPU
accelerator, gloo) and torchrun, each starting `pyramidion_ds.distributed.selftest` twice on this machine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SELFTEST = "pyramidion_ds.distributed.selftest"  # each rank all-reduces once and writes rank{R}.json


def launcher(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found next to {sys.executable} nor on PATH")
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (pytest may itself run under one)."""
    prefixes = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_")
    names = {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CROSS_RANK",
        "CROSS_SIZE",
        "LOCAL_SIZE",
        "PYRAMIDION_LAUNCHER",
    }
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def run_launch(argv: list[str], env: dict[str, str] | None = None, timeout: float = 420):
    return subprocess.run(argv, cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


def assert_two_ranks(out_dir: Path, launcher_name: str, result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}
    assert sorted(ranks) == [0, 1], output[-4000:]
    for rank, record in ranks.items():
        assert record["launcher"] == launcher_name
        assert (record["world_size"], record["torch_world_size"], record["torch_rank"]) == (2, 2, rank)
        assert (record["local_rank"], record["local_world_size"]) == (rank, 2)
        assert record["all_reduce_sum"] == 3.0
    assert len({(r["master_addr"], r["master_port"]) for r in ranks.values()}) == 1
    # DeepSpeed's CPU shm all-reduce segments (66 MB each) are released when the ranks exit
    port = ranks[0]["master_port"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert f"launcher={launcher_name} world_size=2 rank=0" in output


def test_mpiexec(tmp_path):
    argv = [launcher("mpiexec"), "-n", "2", sys.executable, "-m", SELFTEST, str(tmp_path)]
    assert_two_ranks(tmp_path, "mpi", run_launch(argv))


def test_deepspeed_launcher(tmp_path):
    argv = [
        launcher("deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        SELFTEST,
        str(tmp_path),
    ]
    assert_two_ranks(tmp_path, "deepspeed", run_launch(argv))


def test_torchrun(tmp_path):
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        SELFTEST,
        str(tmp_path),
    ]
    assert_two_ranks(tmp_path, "torchrun", run_launch(argv))


def test_mpiexec_with_master_port_in_use_stops_both_ranks(tmp_path):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        argv = [launcher("mpiexec"), "-n", "2", sys.executable, "-m", SELFTEST, str(tmp_path)]
        result = run_launch(argv, env=clean_env(MASTER_PORT=str(port)), timeout=240)
    assert result.returncode != 0
    assert f"error: master port {port} (from MASTER_PORT) is already in use" in result.stderr
    assert not list(tmp_path.glob("rank*.json"))
