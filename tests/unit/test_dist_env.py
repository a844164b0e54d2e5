"""discover_world from plain environment dicts, one launcher (and one bad input) at a time.

`scontrol` is replaced by a fake `run`, name resolution by a table, mpi4py by a fake communicator;
ports are checked for real. The real scontrol/srun are exercised in tests/cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyramidion_ds.distributed import (
    DistEnvError,
    World,
    apply_world,
    discover_world,
    expand_nodelist,
    hostfile_from_slurm,
)
from pyramidion_ds.distributed import env as dist_env


class FakeScontrol:
    """Stands in for subprocess.run(["scontrol", ...]); answers from a table, records the calls."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str, str]] | None = None):
        self.answers = answers or {}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv, **kwargs):
        assert argv[0] == "scontrol"
        key = tuple(argv[1:])
        self.calls.append(key)
        returncode, stdout, stderr = self.answers.get(key, (1, "", f"scontrol: error: no answer for {key}"))
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)


class FakeComm:
    """The two calls discovery makes on MPI.COMM_WORLD; bcast returns what rank 0 proposed."""

    def __init__(self, rank: int, size: int, root_value=None):
        self.rank, self.size, self.root_value = rank, size, root_value
        self.proposed = None

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, obj, root=0):
        self.proposed = obj
        return obj if self.rank == root else self.root_value


@pytest.fixture
def hosts(monkeypatch):
    """Name resolution from a table: unknown names fail like an unknown host does."""
    table = {"node1": "10.1.0.1", "127.0.0.1": "127.0.0.1", "10.9.9.9": "10.9.9.9"}

    def gethostbyname(name):
        if name in table:
            return table[name]
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(dist_env.socket, "gethostbyname", gethostbyname)
    return table


@contextmanager
def listening_port(port: int = 0):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", port))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def slurm_env(**overrides) -> dict[str, str]:
    """What srun gives task 1 of `sbatch --nodes=2 --ntasks-per-node=1` (seen on the local cluster)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_STEP_NODELIST": "node[1-2]",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


SCONTROL_NODES = FakeScontrol(
    {
        ("show", "hostnames", "node[1-2]"): (0, "node1\nnode2\n", ""),
        ("show", "hostnames", "gpu[07-08]"): (0, "gpu07\ngpu08\n", ""),
        ("show", "node", "gpu07"): (
            0,
            "NodeName=gpu07 Arch=x86_64 CoresPerSocket=1\n   NodeAddr=127.0.0.1 NodeHostName=gpu07 Version=22.05.8\n",
            "",
        ),
    }
)


# ------------------------------------------------------------------ torchrun / deepspeed launcher


def test_torchrun_variables():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "none",
    }
    assert discover_world(env) == World(
        rank=3,
        local_rank=1,
        world_size=4,
        local_world_size=2,
        master_addr="10.0.0.5",
        master_port=29400,
        launcher="torchrun",
    )


def test_deepspeed_launcher_variables():
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    world = discover_world(env)
    assert (world.launcher, world.rank, world.world_size, world.local_world_size) == ("deepspeed", 0, 2, 2)


def test_hand_set_variables_assume_one_node_and_the_default_port():
    world = discover_world({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"})
    assert (world.local_rank, world.local_world_size, world.master_port) == (1, 2, 29500)


def test_torch_variables_beat_slurm_ones():
    env = slurm_env(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert discover_world(env, run=FakeScontrol()).launcher == "torchrun"


@pytest.mark.parametrize("missing", ["RANK", "WORLD_SIZE", "MASTER_ADDR"])
def test_torch_variables_incomplete(missing):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    del env[missing]
    with pytest.raises(DistEnvError, match=f"^{missing} is not set"):
        discover_world(env)


def test_rank_not_below_world_size():
    with pytest.raises(DistEnvError, match=r"^RANK=2 is not below WORLD_SIZE=2"):
        discover_world({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "TORCHELASTIC_RUN_ID": "x"})


def test_local_rank_not_below_local_world_size():
    with pytest.raises(DistEnvError, match=r"^LOCAL_RANK=2 is not below"):
        discover_world(
            {
                "RANK": "0",
                "WORLD_SIZE": "4",
                "LOCAL_RANK": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "h",
                "TORCHELASTIC_RUN_ID": "x",
            }
        )


@pytest.mark.parametrize("name,value", [("RANK", "one"), ("WORLD_SIZE", "2.0"), ("MASTER_PORT", "")])
def test_non_integer_variable(name, value):
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "x",
        name: value,
    }
    with pytest.raises(DistEnvError, match=f"^{name}='{value}' is not an integer"):
        discover_world(env)


def test_port_out_of_range():
    with pytest.raises(DistEnvError, match="^MASTER_PORT=70000 is not a TCP port"):
        discover_world({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "70000"})


# ------------------------------------------------------------------ master port already taken


def test_port_in_use_is_an_error_for_rank_0_that_opens_the_store():
    with listening_port() as port:
        env = {
            "RANK": "0",
            "WORLD_SIZE": "2",
            "LOCAL_SIZE": "2",
            "CROSS_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        with pytest.raises(DistEnvError, match=rf"^master port {port} \(from MASTER_PORT\) is already in use"):
            discover_world(env)
        # other ranks only connect; under torchrun the agent itself listens on MASTER_PORT
        assert discover_world(dict(env, RANK="1")).rank == 1
        assert discover_world(dict(env, TORCHELASTIC_RUN_ID="x")).master_port == port


def test_derived_slurm_port_in_use_names_the_job(hosts):
    # find a job id whose derived port we can hold
    for port in range(dist_env.SLURM_PORT_BASE, dist_env.SLURM_PORT_BASE + 200):
        try:
            with listening_port(port):
                job_id = port - dist_env.SLURM_PORT_BASE + 3 * dist_env.SLURM_PORT_SPAN
                env = slurm_env(SLURM_JOB_ID=str(job_id), SLURM_PROCID="0", SLURM_NODEID="0")
                with pytest.raises(DistEnvError, match=rf"port {port} \(from SLURM_JOB_ID={job_id}\) is already"):
                    discover_world(env, run=SCONTROL_NODES)
                return
        except OSError:
            continue
    pytest.fail("no port to hold in the derived range")


# ------------------------------------------------------------------ SLURM


def test_slurm_task(hosts):
    world = discover_world(slurm_env(), run=SCONTROL_NODES)
    assert world == World(
        rank=1,
        local_rank=0,
        world_size=2,
        local_world_size=1,
        master_addr="10.1.0.1",
        master_port=20000 + 4242,
        launcher="slurm",
    )


def test_slurm_port_follows_the_job_id():
    assert dist_env.slurm_port(123456) == 23456
    assert dist_env.slurm_port(123457) != dist_env.slurm_port(123456)
    assert all(20000 <= dist_env.slurm_port(j) < 30000 for j in (0, 1, 9999, 10000, 987654321))


def test_slurm_master_from_node_addr_when_the_name_does_not_resolve(hosts):
    env = slurm_env(SLURM_STEP_NODELIST="gpu[07-08]", SLURM_JOB_NODELIST="gpu[07-08]")
    run = FakeScontrol(SCONTROL_NODES.answers)
    assert discover_world(env, run=run).master_addr == "127.0.0.1"
    assert run.calls == [("show", "hostnames", "gpu[07-08]"), ("show", "node", "gpu07")]


def test_slurm_step_nodelist_wins_over_the_job_one(hosts):
    env = slurm_env(SLURM_JOB_NODELIST="gpu[07-08],node[1-2]", SLURM_STEP_NODELIST="node[1-2]")
    assert discover_world(env, run=SCONTROL_NODES).master_addr == "10.1.0.1"


def test_slurm_single_node_list_needs_no_scontrol(hosts):
    run = FakeScontrol()
    env = slurm_env(
        SLURM_STEP_NODELIST="node1",
        SLURM_JOB_NODELIST="node1",
        SLURM_NODEID="0",
        SLURM_STEP_TASKS_PER_NODE="2",
        SLURM_LOCALID="1",
    )
    world = discover_world(env, run=run)
    assert (world.master_addr, world.local_rank, world.local_world_size) == ("10.1.0.1", 1, 2)
    assert run.calls == []


def test_slurm_master_variables_override():
    run = FakeScontrol()
    world = discover_world(slurm_env(MASTER_ADDR="10.9.9.9", MASTER_PORT="31000"), run=run)
    assert (world.master_addr, world.master_port, world.launcher) == ("10.9.9.9", 31000, "slurm")
    assert run.calls == []


def test_slurm_uneven_tasks_per_node(hosts):
    env = slurm_env(
        SLURM_NTASKS="7",
        SLURM_PROCID="6",
        SLURM_NODEID="3",
        SLURM_STEP_TASKS_PER_NODE="2(x3),1",
        SLURM_NTASKS_PER_NODE=None,
    )
    assert discover_world(env, run=SCONTROL_NODES).local_world_size == 1
    assert dist_env.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(DistEnvError, match=r"^SLURM_NODEID=4 but SLURM_STEP_TASKS_PER_NODE=2\(x3\),1 lists 4"):
        discover_world(dict(env, SLURM_NODEID="4"), run=SCONTROL_NODES)


def batch_script_env(**overrides) -> dict[str, str]:
    """What the batch script of `sbatch --nodes=2 --ntasks-per-node=1` sees (no step, yet a PROCID)."""
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NPROCS": "2",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NNODES": "2",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_sbatch_script_without_srun():
    with pytest.raises(DistEnvError, match=r"^SLURM_JOB_ID=77 is set but SLURM_STEP_ID is not: .*run under srun"):
        discover_world(batch_script_env(), run=FakeScontrol())


def test_salloc_shell_without_task_variables():
    env = batch_script_env(SLURM_PROCID=None, SLURM_NTASKS=None, SLURM_NPROCS=None)
    with pytest.raises(DistEnvError, match=r"^SLURM_JOB_ID=77 is set but SLURM_PROCID is not: .*run under srun"):
        discover_world(env, run=FakeScontrol())


def test_one_task_job_may_run_without_srun():
    run = FakeScontrol()
    world = discover_world(batch_script_env(SLURM_NTASKS="1", SLURM_NPROCS="1"), run=run)
    assert world == World(0, 0, 1, 1, "127.0.0.1", 20077, "slurm")
    assert run.calls == []


def test_slurm_rank_not_below_ntasks(hosts):
    with pytest.raises(DistEnvError, match=r"^SLURM_PROCID=2 is not below SLURM_NTASKS=2"):
        discover_world(slurm_env(SLURM_PROCID="2"), run=SCONTROL_NODES)


def test_slurm_non_integer():
    with pytest.raises(DistEnvError, match=r"^SLURM_PROCID='x' is not an integer"):
        discover_world(slurm_env(SLURM_PROCID="x"), run=FakeScontrol())


def test_slurm_nodelist_that_does_not_expand():
    run = FakeScontrol({("show", "hostnames", "node[1-"): (1, "", "scontrol: error: Invalid hostlist: node[1-\n")})
    env = slurm_env(SLURM_STEP_NODELIST="node[1-", SLURM_JOB_NODELIST="node[1-")
    with pytest.raises(DistEnvError, match=r"^SLURM_STEP_NODELIST=node\[1- does not expand: .*Invalid hostlist"):
        discover_world(env, run=run)


def test_slurm_node_that_does_not_resolve(hosts):
    run = FakeScontrol(
        {
            ("show", "hostnames", "ghost[1-2]"): (0, "ghost1\nghost2\n", ""),
            ("show", "node", "ghost1"): (1, "", "Node ghost1 not found\n"),
        }
    )
    env = slurm_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST="ghost[1-2]")
    with pytest.raises(DistEnvError, match=r"^SLURM_JOB_NODELIST=ghost\[1-2\]: node ghost1 does not resolve"):
        discover_world(env, run=run)


def test_slurm_without_nodelist():
    env = slurm_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=None)
    with pytest.raises(DistEnvError, match="master node is unknown"):
        discover_world(env, run=FakeScontrol())


def test_nodelist_expansion_without_scontrol():
    def no_scontrol(argv, **kwargs):
        raise FileNotFoundError(argv[0])

    assert expand_nodelist("gpu[07-09,12],cpu-a[1-2]x[3-4]", run=no_scontrol) == [
        "gpu07",
        "gpu08",
        "gpu09",
        "gpu12",
        "cpu-a1x3",
        "cpu-a1x4",
        "cpu-a2x3",
        "cpu-a2x4",
    ]
    with pytest.raises(DistEnvError, match="does not expand"):
        expand_nodelist("gpu[a-b]", run=no_scontrol)


# ------------------------------------------------------------------ MPI


def test_open_mpi_variables_and_master_from_the_environment():
    port = free_port()
    env = {
        "OMPI_COMM_WORLD_RANK": "0",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "MASTER_ADDR": "10.0.0.2",
        "MASTER_PORT": str(port),
    }
    comm = FakeComm(rank=0, size=8)
    assert discover_world(env, mpi_comm=comm) == World(0, 0, 8, 4, "10.0.0.2", port, "mpi")
    assert comm.proposed == ("10.0.0.2", port)


def test_hydra_variables_take_the_rendezvous_from_rank_0():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    world = discover_world(env, mpi_comm=FakeComm(rank=1, size=2, root_value=("10.0.0.1", 23456)))
    assert world == World(1, 1, 2, 2, "10.0.0.1", 23456, "mpi")


def test_mpi_rank_0_proposes_loopback_and_a_free_port_on_one_node():
    comm = FakeComm(rank=0, size=2)
    world = discover_world(
        {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}, mpi_comm=comm
    )
    assert comm.proposed == (world.master_addr, world.master_port)
    assert world.master_addr == "127.0.0.1" and 0 < world.master_port < 65536


def test_mpi_port_in_use_stops_every_rank():
    with listening_port() as port:
        env = {
            "PMI_RANK": "0",
            "PMI_SIZE": "2",
            "MPI_LOCALRANKID": "0",
            "MPI_LOCALNRANKS": "2",
            "MASTER_PORT": str(port),
        }
        rank_0 = FakeComm(rank=0, size=2)
        with pytest.raises(DistEnvError, match=rf"^master port {port} \(from MASTER_PORT\) is already in use"):
            discover_world(env, mpi_comm=rank_0)
        # rank 1 receives rank 0's verdict through the broadcast and stops too
        rank_1 = FakeComm(rank=1, size=2, root_value=rank_0.proposed)
        with pytest.raises(DistEnvError, match=rf"^master port {port} "):
            discover_world(dict(env, PMI_RANK="1", MPI_LOCALRANKID="1"), mpi_comm=rank_1)


def test_mpi_variables_that_disagree_with_mpi():
    with pytest.raises(DistEnvError, match="MPI variables say rank 1 of 2 but MPI_COMM_WORLD says 0 of 1"):
        discover_world({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, mpi_comm=FakeComm(0, 1))


def test_pmi_rank_without_size():
    with pytest.raises(DistEnvError, match="^PMI_SIZE is not set"):
        discover_world({"PMI_RANK": "0"})


def test_mpirun_inside_a_slurm_allocation_uses_the_mpi_world():
    # Open MPI's mpirun starts one helper per node with srun: its SLURM_PROCID is the node's index
    env = slurm_env(
        SLURM_PROCID="0",
        SLURM_NTASKS="2",
        OMPI_COMM_WORLD_RANK="3",
        OMPI_COMM_WORLD_SIZE="8",
        OMPI_COMM_WORLD_LOCAL_RANK="3",
        OMPI_COMM_WORLD_LOCAL_SIZE="4",
    )
    comm = FakeComm(rank=3, size=8, root_value=("10.0.0.2", 29600))
    assert discover_world(env, run=FakeScontrol(), mpi_comm=comm) == World(3, 3, 8, 4, "10.0.0.2", 29600, "mpi")


def test_srun_with_pmi_variables_stays_slurm(hosts):
    env = slurm_env(PMI_RANK="1", PMI_SIZE="2")  # srun --mpi=pmi2 sets PMI_RANK == SLURM_PROCID
    assert discover_world(env, run=SCONTROL_NODES).launcher == "slurm"


# ------------------------------------------------------------------ single process, apply_world


def test_single_process():
    world = discover_world({})
    assert (world.launcher, world.rank, world.world_size, world.master_addr) == ("single", 0, 1, "127.0.0.1")


def test_apply_world_round_trip():
    world = World(1, 0, 2, 1, "10.1.0.1", 24242, "slurm")
    environ: dict[str, str] = {}
    apply_world(world, environ)
    assert {
        k: environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    } == {
        "RANK": "1",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "10.1.0.1",
        "MASTER_PORT": "24242",
    }
    # once applied, the world reads back the same, launcher included
    assert discover_world(environ) == world


def test_world_prints_for_the_log():
    assert str(World(0, 0, 2, 1, "127.0.0.1", 24242, "slurm")) == (
        "launcher=slurm world_size=2 rank=0 local_rank=0/1 master=127.0.0.1:24242"
    )


# ------------------------------------------------------------------ hostfile, import cost


def test_hostfile_from_slurm():
    assert hostfile_from_slurm("gpu[07-08]", 8, run=SCONTROL_NODES) == "gpu07 slots=8\ngpu08 slots=8\n"
    with pytest.raises(DistEnvError, match="slots=0"):
        hostfile_from_slurm("gpu07", 0)


def test_importing_dist_pulls_in_no_heavy_module():
    code = (
        "import sys, pyramidion_ds.distributed; "
        "print(sorted(m for m in ('torch', 'deepspeed', 'mpi4py', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


EXIT_CHECK = """
import atexit
import torch.distributed as dist
# registered first, so it runs last: after every other exit handler, the group must be gone
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
from pyramidion_ds.distributed.env import init_distributed
init_distributed(backend="gloo")
print("initialized:", dist.is_initialized(), flush=True)
"""


def test_process_group_is_destroyed_before_the_interpreter_ends(tmp_path):
    """A rank that leaves its gloo group to the interpreter's teardown can abort after its work is done
    ("terminate called without an active exception", the launcher's exit 250; pytorch/pytorch#190489): it
    struck one ZeRO-3 launch in a few hundred in .ci/run. init_distributed destroys the group at exit."""
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(
        os.environ,
        PYTHONPATH=str(root),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    child = subprocess.run(
        [sys.executable, "-c", EXIT_CHECK], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines()[-2:] == ["initialized: True", "initialized at exit: False"], child.stdout
