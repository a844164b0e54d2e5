"""Who am I in the job? Turn whatever launched this process into one `World`.

Every launcher tells a process its place in the job differently:

    torchrun / deepspeed launcher   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (ready to use)
    srun (SLURM)                    SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_STEP_NODELIST, SLURM_JOB_ID
    mpiexec / mpirun                OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK/PMI_SIZE + MPI_LOCALRANKID (MPICH/Hydra)
    nothing                         a single process

`discover_world` reads them (first match wins, in that order) into a `World`; `apply_world` writes
the torch.distributed variables back into `os.environ`; `init_distributed` does both and then calls
`deepspeed.init_distributed`. Inconsistent or incomplete variables raise `DistEnvError` with one line
naming the variable and its value, so a bad launch stops at once instead of hanging in a rendezvous.

This module imports only the standard library at load time; torch, deepspeed and mpi4py are imported
inside the functions that need them (importing mpi4py calls MPI_Init).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import re
import socket
import subprocess
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

log = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "deepspeed", "slurm", "mpi", "single")

# Derived SLURM rendezvous ports fall in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN): above
# the registered ports torch and friends use by default (29500) only by accident, and below the Linux
# ephemeral range (32768+) so an outgoing connection never holds our port.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000
DEFAULT_MASTER_PORT = 29500  # torch.distributed's default, used when a launcher sets no port

# apply_world records the detected launcher here, so a later discover_world (which then sees the
# torchrun-style variables we wrote) still reports where the job really came from.
LAUNCHER_ENV = "PYRAMIDION_LAUNCHER"


class DistEnvError(RuntimeError):
    """The launcher's variables do not describe a usable world (the message names which one)."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job, as torch.distributed needs it."""

    rank: int
    """global rank, 0 ≤ rank < world_size"""
    local_rank: int
    """rank among the processes of this node (selects the GPU)"""
    world_size: int
    local_world_size: int
    """processes on this node"""
    master_addr: str
    """address of rank 0's node, where the rendezvous store listens"""
    master_port: int
    launcher: str
    """one of LAUNCHERS"""

    def __str__(self) -> str:
        return (
            f"launcher={self.launcher} world_size={self.world_size} rank={self.rank} "
            f"local_rank={self.local_rank}/{self.local_world_size} "
            f"master={self.master_addr}:{self.master_port}"
        )


Run = Callable[..., "subprocess.CompletedProcess[str]"]


# --------------------------------------------------------------------------------------------------
# public API


#: where each launcher puts a process's rank among those of its node (torchrun/DeepSpeed, srun, Open MPI, MPICH)
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def local_rank_from_env(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank on its node, read from the launcher's variables alone (0 when none is set): for
    deciding who speaks before, or without, a full ``discover_world``."""
    for name in LOCAL_RANK_VARS:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 0


def discover_world(env: Mapping[str, str] = os.environ, *, run: Run = subprocess.run, mpi_comm: Any = None) -> World:
    """Read the launcher's environment into a `World`.

    Precedence: explicit torch variables (RANK, WORLD_SIZE, MASTER_ADDR: torchrun, the deepspeed
    launcher, or a user) → SLURM task variables (srun) → MPI launcher variables → single process.
    An `mpirun` started inside a SLURM allocation sets both SLURM and MPI variables that disagree
    (SLURM's then describe mpirun's helper task on each node); the MPI ones win in that case.

    `run` executes `scontrol` (tests pass a fake). `mpi_comm` is only used under MPI, to check the
    variables and agree on the rendezvous; by default `mpi4py.MPI.COMM_WORLD` (imported only then:
    that calls MPI_Init).
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        world = _world_from_torch_env(env)
    elif "SLURM_JOB_ID" in env and _mpi_launched(env) and not _mpi_agrees_with_slurm(env):
        world = _world_from_mpi(env, mpi_comm)
    elif "SLURM_JOB_ID" in env:
        world = _world_from_slurm(env, run)
    elif _mpi_launched(env) or "PMI_RANK" in env:
        world = _world_from_mpi(env, mpi_comm)
    else:
        world = _single_world(env)
    _check_world(world)
    if world.rank == 0 and _we_bind_master_port(world, env) and _port_in_use(world.master_port):
        raise DistEnvError(_port_in_use_message(world.master_port, _port_source(world, env)))
    return world


def apply_world(world: World, environ: dict[str, str] | None = None) -> None:
    """Write the world into the variables torch.distributed's env:// rendezvous reads."""
    target = os.environ if environ is None else environ
    target.update(
        {
            "RANK": str(world.rank),
            "LOCAL_RANK": str(world.local_rank),
            "WORLD_SIZE": str(world.world_size),
            "LOCAL_WORLD_SIZE": str(world.local_world_size),
            "MASTER_ADDR": world.master_addr,
            "MASTER_PORT": str(world.master_port),
            LAUNCHER_ENV: world.launcher,
        }
    )


def init_distributed(backend: str | None = None, timeout_minutes: float = 30) -> World:
    """Discover the world, export it, and initialise torch.distributed through DeepSpeed.

    backend: "nccl" on CUDA machines, "gloo" otherwise, unless given. Returns the world.
    """
    from datetime import timedelta

    world = discover_world()
    apply_world(world)
    if world.rank == 0:
        log.info("distributed: %s", world)

    import torch

    if not torch.cuda.is_available():
        use_cpu_accelerator()
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    else:
        skip_cpu_shm_allreduce()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    # Every variable deepspeed wants is set now, so auto_mpi_discovery would do nothing; keep it off
    # so DeepSpeed never overrides our world with its own (fixed-port) MPI guess.
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        distributed_port=world.master_port,
        verbose=world.rank == 0,
        timeout=timedelta(minutes=timeout_minutes),
    )
    if not torch.cuda.is_available():
        release_cpu_shm_segment(world)
    atexit.register(destroy_process_group_at_exit)
    return world


def end_rank(code: int) -> NoReturn:
    """End a rank's process with ``code`` once its work is done (checkpoints, logs and tensorboard closed):
    destroy the process group, flush the logs and streams, and leave with ``os._exit``. A normal interpreter
    exit tears down native objects that DeepSpeed still references (its process groups among them), and a
    finished rank could abort there: "terminate called without an active exception", the launcher's exit 250,
    about one 2-rank launch in a few hundred in .ci/run, ZeRO-2 and ZeRO-3 alike, after "done" and the save."""
    import sys

    destroy_process_group_at_exit()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be said through it
            pass
    os._exit(code)


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group while the interpreter is still whole (registered at exit by
    init_distributed, and called by :func:`end_rank`): left to the interpreter's teardown, gloo's worker
    threads can still hold work whose tensors need the GIL (pytorch/pytorch#190489). Training ranks end through
    :func:`end_rank`, which also skips the rest of the teardown. A no-op when the group is gone already."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # the process is ending either way: say why the group was not closed
            log.warning("distributed: the process group was not destroyed at exit: %s", err)


def use_cpu_accelerator(environ: dict[str, str] | None = None) -> None:
    """Tell DeepSpeed it runs on the CPU (``DS_ACCELERATOR=cpu``) unless the user chose an accelerator.

    Without it every process that imports deepspeed on a machine without GPUs probes for one and warns
    "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." (six
    times a 2-rank launch). Call it only where torch sees no CUDA device, before deepspeed is imported."""
    target = os.environ if environ is None else environ
    target.setdefault("DS_ACCELERATOR", "cpu")


def skip_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU accelerator from building its shared-memory all-reduce op.

    ``deepspeed.init_distributed`` JIT-compiles that C++ op on the first run of a machine (1-2 minutes
    of silence, then "deepspeed_shm_comm_op built successfully" from every rank) and maps a 66 MB /dev/shm
    segment per rank. Only ``inference_all_reduce`` (DeepSpeed's inference kernels) uses it; training
    reduces through torch.distributed (gloo), so nothing is lost. DeepSpeed reads op compatibility from
    the cached ``deepspeed.ops.__compatible_ops__`` dict, which is meant to be edited this way."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# DeepSpeed's CPU accelerator builds a shared-memory all-reduce (used only by inference kernels) in
# deepspeed.init_distributed: each rank creates /dev/shm/<prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
# (66 MB) and maps its peers' segments, but never unlinks its own. Every CPU job left world_size x 66 MB
# of RAM in /dev/shm; a day of tests filled 20 of this machine's 24 GiB.
SHM_SEGMENT_PREFIX = "deepspeed_allreduce_buffer"


def cpu_shm_segment(world: World) -> str:
    """Path of the /dev/shm segment DeepSpeed's CPU shm all-reduce creates for ``world.rank``."""
    return f"/dev/shm/{SHM_SEGMENT_PREFIX}_{os.getuid()}_{world.master_addr}_{world.master_port}_{world.rank}"


def release_cpu_shm_segment(world: World) -> None:
    """Unlink this rank's DeepSpeed shm segment once every rank has mapped it (the barrier): the
    mappings stay valid, and the memory returns to the system when the last rank exits."""
    path = cpu_shm_segment(world)
    if not os.path.exists(path):
        return  # no shm all-reduce here (ranks on several nodes, or DeepSpeed built without it)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------------
# torchrun / deepspeed launcher / explicit variables


def _world_from_torch_env(env: Mapping[str, str]) -> World:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        if not env.get(name):
            present = ", ".join(f"{n}={env[n]}" for n in ("RANK", "WORLD_SIZE", "MASTER_ADDR") if n in env)
            raise DistEnvError(
                f"{name} is not set but {present} is: a torchrun-style launch needs RANK, "
                "WORLD_SIZE and MASTER_ADDR (and MASTER_PORT) together"
            )
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE")
    # A hand-made launch may omit the local variables: then assume one node.
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    if "LOCAL_WORLD_SIZE" in env:
        local_world_size = _int(env, "LOCAL_WORLD_SIZE")
    elif "LOCAL_SIZE" in env:  # deepspeed.launcher.launch
        local_world_size = _int(env, "LOCAL_SIZE")
    else:
        local_world_size = world_size
    if env.get(LAUNCHER_ENV) in LAUNCHERS:
        launcher = env[LAUNCHER_ENV]
    elif "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    else:
        launcher = "torchrun"
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
    return World(rank, local_rank, world_size, local_world_size, env["MASTER_ADDR"], port, launcher)


# --------------------------------------------------------------------------------------------------
# SLURM


def _world_from_slurm(env: Mapping[str, str], run: Run) -> World:
    job_id = _int(env, "SLURM_JOB_ID")
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if not in_step or "SLURM_PROCID" not in env:
        # The batch script (and an salloc shell) has SLURM_JOB_ID and even SLURM_PROCID=0 with the
        # job's SLURM_NTASKS, but no step: started there, this process would wait for ranks that
        # nobody launches. One task is fine (`python train.py` in a 1-task job); more need srun.
        job_tasks = _int(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1
        if job_tasks > 1 or "SLURM_PROCID" not in env:
            missing = "SLURM_STEP_ID" if "SLURM_PROCID" in env else "SLURM_PROCID"
            raise DistEnvError(
                f"SLURM_JOB_ID={job_id} is set but {missing} is not: this is the batch script (or an "
                f"salloc shell), not a task of the job's {job_tasks} task(s); run under srun, e.g. "
                "`srun python -m pyramidion_ds.cli.train ...`"
            )
        return World(
            0, 0, 1, 1, "127.0.0.1", _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(job_id), "slurm"
        )
    rank = _int(env, "SLURM_PROCID")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    if "SLURM_NTASKS" in env:
        world_size = _int(env, "SLURM_NTASKS")
    elif "SLURM_NPROCS" in env:
        world_size = _int(env, "SLURM_NPROCS")
    else:
        raise DistEnvError(f"SLURM_PROCID={rank} is set but SLURM_NTASKS is not: cannot tell the world size")
    local_world_size = _slurm_local_world_size(env)

    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    else:
        # The step's node list is where this srun's tasks run (task 0 on its first node); the job's
        # list may be wider when the step was restricted with srun -w / -N.
        for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            if env.get(var):
                break
        else:
            raise DistEnvError(
                f"SLURM_JOB_ID={job_id}: none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST is "
                "set, so the master node is unknown (set MASTER_ADDR)"
            )
        first_host = first_host_of_nodelist(env[var], run=run, var=var)
        master_addr = resolve_slurm_node(first_host, run=run, var=var, nodelist=env[var])

    if "MASTER_PORT" in env:
        master_port = _int(env, "MASTER_PORT")
    else:
        master_port = slurm_port(job_id)
    return World(rank, local_rank, world_size, local_world_size, master_addr, master_port, "slurm")


def slurm_port(job_id: int) -> int:
    """A rendezvous port derived from the job id: jobs sharing a node (and their ids) differ."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _slurm_local_world_size(env: Mapping[str, str]) -> int:
    # SLURM_STEP_TASKS_PER_NODE is compressed per node, e.g. "2(x3),1": index it by SLURM_NODEID.
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(var):
            counts = expand_tasks_per_node(env[var], var=var)
            node_id = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
            if node_id >= len(counts):
                raise DistEnvError(f"SLURM_NODEID={node_id} but {var}={env[var]} lists {len(counts)} node(s)")
            return counts[node_id]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE")
    return 1


def expand_tasks_per_node(value: str, *, var: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """'2(x3),1' → [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise DistEnvError(f"{var}={value} is not a SLURM task count list like '2(x3),1'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def expand_nodelist(nodelist: str, *, run: Run = subprocess.run, var: str = "SLURM_JOB_NODELIST") -> list[str]:
    """All host names of a SLURM node list ('node[01-03],gpu7'), expanded by `scontrol show hostnames`."""
    if not any(c in nodelist for c in "[],"):
        return [nodelist.strip()]
    try:
        result = run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        # e.g. inside a container that lacks the SLURM client: the bracket syntax is simple enough.
        return _expand_nodelist_python(nodelist, var)
    except subprocess.TimeoutExpired:
        raise DistEnvError(f"{var}={nodelist}: `scontrol show hostnames` did not answer in 60 s") from None
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        reason = (result.stderr or "").strip().splitlines()
        raise DistEnvError(
            f"{var}={nodelist} does not expand: `scontrol show hostnames` said "
            f"{reason[-1] if reason else f'nothing (exit {result.returncode})'}"
        )
    return hosts


def first_host_of_nodelist(nodelist: str, *, run: Run = subprocess.run, var: str = "SLURM_JOB_NODELIST") -> str:
    return expand_nodelist(nodelist, run=run, var=var)[0]


def resolve_slurm_node(
    name: str, *, run: Run = subprocess.run, var: str = "SLURM_JOB_NODELIST", nodelist: str | None = None
) -> str:
    """An IP address for a SLURM node name: DNS / /etc/hosts first, else the node's NodeAddr.

    Node names need not resolve (slurm.conf may map them to NodeAddr=…); ask the controller then.
    """
    try:
        return socket.gethostbyname(name)
    except OSError:
        pass
    where = f"{var}={nodelist if nodelist is not None else name}"
    try:
        result = run(["scontrol", "show", "node", name], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise DistEnvError(
            f"{where}: node {name} does not resolve and scontrol is not installed to "
            "look up its NodeAddr; set MASTER_ADDR"
        ) from None
    except subprocess.TimeoutExpired:
        raise DistEnvError(f"{where}: node {name} does not resolve and `scontrol show node` timed out") from None
    match = re.search(r"\bNodeAddr=(\S+)", result.stdout or "")
    if result.returncode != 0 or not match:
        raise DistEnvError(
            f"{where}: node {name} does not resolve and `scontrol show node {name}` gives no NodeAddr; set MASTER_ADDR"
        )
    addr = match.group(1)
    try:
        return socket.gethostbyname(addr)
    except OSError:
        raise DistEnvError(
            f"{where}: node {name} has NodeAddr={addr}, which does not resolve either; set MASTER_ADDR"
        ) from None


def hostfile_from_slurm(nodelist: str, slots: int, *, run: Run = subprocess.run) -> str:
    """A DeepSpeed hostfile for `deepspeed --hostfile`: 'node[1-2]', 4 → 'node1 slots=4\\nnode2 slots=4\\n'."""
    if slots < 1:
        raise DistEnvError(f"slots={slots}: each host needs at least one slot")
    return "".join(f"{host} slots={slots}\n" for host in expand_nodelist(nodelist, run=run))


def _expand_nodelist_python(nodelist: str, var: str) -> list[str]:
    """Fallback for `scontrol show hostnames`: 'a[01-02,5]b[1-2],c' → a01b1 a01b2 a02b1 … c."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [literal]
            if ranges:
                choices = []
                for piece in ranges.split(","):
                    lo, _, hi = piece.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise DistEnvError(f"{var}={nodelist} does not expand: bad range [{ranges}]")
                    choices += [literal + str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
            expanded = [e + c for e in expanded for c in choices]
        hosts += expanded
    if not hosts or any(not h for h in hosts):
        raise DistEnvError(f"{var}={nodelist} does not expand to host names")
    return hosts


# --------------------------------------------------------------------------------------------------
# MPI (Open MPI's mpirun, MPICH/Intel MPI's Hydra mpiexec)


def _mpi_launched(env: Mapping[str, str]) -> bool:
    """Variables only an MPI launcher sets (srun --mpi=pmi2 sets PMI_RANK but none of these)."""
    return "OMPI_COMM_WORLD_RANK" in env or "MPI_LOCALRANKID" in env


def _mpi_rank_and_size(env: Mapping[str, str]) -> tuple[int, int]:
    if "OMPI_COMM_WORLD_RANK" in env:
        return _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    return _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")


def _mpi_agrees_with_slurm(env: Mapping[str, str]) -> bool:
    rank, size = _mpi_rank_and_size(env)
    return env.get("SLURM_PROCID") == str(rank) and env.get("SLURM_NTASKS") == str(size)


def _world_from_mpi(env: Mapping[str, str], mpi_comm: Any) -> World:
    """Rank and size from the launcher's variables, checked against MPI_COMM_WORLD; rank 0 picks the
    rendezvous (MASTER_ADDR/MASTER_PORT if set, else its address and a free port) and broadcasts it.

    The broadcast carries rank 0's errors too (a port in use), so every rank stops together: mpiexec
    does not stop the other ranks when one merely exits non-zero, and they would wait for a
    rendezvous that never opens.
    """
    rank, world_size = _mpi_rank_and_size(env)
    if mpi_comm is None:
        from mpi4py import MPI  # calls MPI_Init

        mpi_comm = MPI.COMM_WORLD
    if (mpi_comm.Get_rank(), mpi_comm.Get_size()) != (rank, world_size):
        raise DistEnvError(
            f"MPI variables say rank {rank} of {world_size} but MPI_COMM_WORLD says "
            f"{mpi_comm.Get_rank()} of {mpi_comm.Get_size()}"
        )
    for rank_var, size_var in (
        ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ):
        if rank_var in env and size_var in env:
            local_rank, local_world_size = _int(env, rank_var), _int(env, size_var)
            break
    else:  # the launcher did not say: count the ranks sharing this node's memory
        from mpi4py import MPI

        node_comm = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_world_size = node_comm.Get_rank(), node_comm.Get_size()

    proposal: tuple[str, int] | str | None = None
    if rank == 0:
        # one node: loopback; several: an address the other nodes can reach
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_world_size == world_size else _routable_address())
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
            proposal = (
                _port_in_use_message(port, "MASTER_PORT") if world_size > 1 and _port_in_use(port) else (addr, port)
            )
        else:
            proposal = (addr, _free_port())
    proposal = mpi_comm.bcast(proposal, root=0)
    if isinstance(proposal, str):
        raise DistEnvError(proposal)
    master_addr, master_port = proposal
    return World(rank, local_rank, world_size, local_world_size, master_addr, master_port, "mpi")


def _routable_address() -> str:
    addr = socket.gethostbyname(socket.gethostname())
    if addr.startswith("127."):  # Debian maps the host name to 127.0.1.1
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        addr = out[0] if out else addr
    return addr


# --------------------------------------------------------------------------------------------------
# single process, checks


def _single_world(env: Mapping[str, str]) -> World:
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
    return World(0, 0, 1, 1, env.get("MASTER_ADDR") or "127.0.0.1", port, "single")


def _check_world(world: World) -> None:
    names = _VARIABLE_NAMES[world.launcher]
    if world.world_size < 1:
        raise DistEnvError(f"{names['world_size']}={world.world_size}: the world size must be at least 1")
    if not 0 <= world.rank < world.world_size:
        raise DistEnvError(
            f"{names['rank']}={world.rank} is not below {names['world_size']}="
            f"{world.world_size}: ranks run from 0 to world size - 1"
        )
    if not 0 <= world.local_rank < world.local_world_size:
        raise DistEnvError(
            f"{names['local_rank']}={world.local_rank} is not below the {world.local_world_size} "
            f"process(es) on this node ({names['local_world_size']})"
        )
    if not 0 < world.master_port < 65536:
        raise DistEnvError(f"MASTER_PORT={world.master_port} is not a TCP port (1-65535)")


_VARIABLE_NAMES = {
    "torchrun": dict(
        rank="RANK", world_size="WORLD_SIZE", local_rank="LOCAL_RANK", local_world_size="LOCAL_WORLD_SIZE"
    ),
    "slurm": dict(
        rank="SLURM_PROCID",
        world_size="SLURM_NTASKS",
        local_rank="SLURM_LOCALID",
        local_world_size="SLURM_STEP_TASKS_PER_NODE",
    ),
    "mpi": dict(
        rank="MPI rank", world_size="MPI world size", local_rank="MPI local rank", local_world_size="MPI local size"
    ),
    "single": dict(rank="rank", world_size="world size", local_rank="local rank", local_world_size="local size"),
}
_VARIABLE_NAMES["deepspeed"] = dict(_VARIABLE_NAMES["torchrun"], local_world_size="LOCAL_SIZE")


def _we_bind_master_port(world: World, env: Mapping[str, str]) -> bool:
    """Should rank 0 check MASTER_PORT here? Not under torchrun, whose agent already listens on it,
    not for a single process (no other rank connects), and not under MPI (checked collectively)."""
    if world.world_size == 1 or world.launcher == "mpi":
        return False
    return world.launcher != "torchrun" and "TORCHELASTIC_RUN_ID" not in env


def _port_in_use(port: int) -> bool:
    # Bind the way torch's TCPStore does (SO_REUSEADDR, all interfaces): a socket in TIME_WAIT from a
    # previous run does not count, a listening one does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def _port_in_use_message(port: int, source: str) -> str:
    return (
        f"master port {port} (from {source}) is already in use on {socket.gethostname()}; "
        "another job holds it: set MASTER_PORT to a free port"
    )


def _port_source(world: World, env: Mapping[str, str]) -> str:
    if "MASTER_PORT" in env:
        return "MASTER_PORT"
    if world.launcher == "slurm":
        return f"SLURM_JOB_ID={env.get('SLURM_JOB_ID')}"
    return "rank 0"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise DistEnvError(f"{name} is not set")
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DistEnvError(f"{name}={value!r} is not an integer") from None
