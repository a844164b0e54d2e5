"""Rank discovery under a real SLURM: sbatch → srun → pyramidion_ds.distributed → a gloo all-reduce.

Runs `pyramidion_ds.distributed.selftest` (no trainer needed) on the two-node local cluster of conftest.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def batch_script(path: Path, body: str) -> Path:
    """A batch script that runs the venv's python (absolute path) on this checkout."""
    path.write_text(f"""#!/bin/bash
set -euo pipefail
export PYTHONPATH={REPO}
PYTHON={sys.executable}
{body}
""")
    return path


def read_ranks(out_dir: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))}


def test_two_nodes_rendezvous_through_srun(slurm_cluster, tmp_path):
    out_dir = tmp_path / "ranks"
    script = batch_script(
        tmp_path / "selftest.sbatch",
        f"srun --kill-on-bad-exit=1 $PYTHON -m pyramidion_ds.distributed.selftest {out_dir}",
    )
    job_id = slurm_cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out", "--time=10", script, cwd=tmp_path
    )
    info = slurm_cluster.wait_job(job_id, timeout=420)
    log = (tmp_path / f"job-{job_id}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log

    ranks = read_ranks(out_dir)
    assert sorted(ranks) == [0, 1], log
    assert {r["slurm_nodename"] for r in ranks.values()} == {"node1", "node2"}
    for rank, record in ranks.items():
        assert record["launcher"] == "slurm"
        assert (record["world_size"], record["torch_world_size"], record["torch_rank"]) == (2, 2, rank)
        assert (record["local_rank"], record["local_world_size"]) == (0, 1)
        assert record["all_reduce_sum"] == 3.0  # (0 + 1) + (1 + 1)
        # node1 does not resolve here: the address came from `scontrol show node node1` (NodeAddr)
        assert record["master_addr"] == "127.0.0.1"
        assert record["master_port"] == 20000 + job_id % 10000
    assert f"launcher=slurm world_size=2 rank=0 local_rank=0/1 master=127.0.0.1:{20000 + job_id % 10000}" in log


def test_selftest_without_srun_says_so(slurm_cluster, tmp_path):
    out_dir = tmp_path / "ranks"
    script = batch_script(tmp_path / "nosrun.sbatch", f"$PYTHON -m pyramidion_ds.distributed.selftest {out_dir}")
    job_id = slurm_cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out", "--time=5", script, cwd=tmp_path
    )
    info = slurm_cluster.wait_job(job_id, timeout=120)
    log = (tmp_path / f"job-{job_id}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert f"error: SLURM_JOB_ID={job_id} is set but SLURM_STEP_ID is not" in log
    assert "run under srun" in log
    assert not out_dir.exists()


def test_hostfile_for_the_allocation(slurm_cluster, tmp_path):
    script = batch_script(tmp_path / "hostfile.sbatch", f"PYTHON=$PYTHON {REPO}/launch/slurm/hostfile.sh")
    job_id = slurm_cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/hostfile", "--time=5", script, cwd=tmp_path
    )
    info = slurm_cluster.wait_job(job_id, timeout=120)
    hostfile = (tmp_path / "hostfile").read_text()
    assert info["JobState"] == "COMPLETED", hostfile
    assert hostfile == "node1 slots=1\nnode2 slots=1\n"
