"""Distributed launch: rank discovery for torchrun / DeepSpeed launcher / SLURM / MPI and DeepSpeed
hostfiles from a SLURM allocation (`env`; `python -m pyramidion_ds.distributed.hostfile` prints one)."""

from pyramidion_ds.distributed.env import (
    DistEnvError,
    World,
    apply_world,
    discover_world,
    expand_nodelist,
    hostfile_from_slurm,
    init_distributed,
)

__all__ = [
    "DistEnvError",
    "World",
    "apply_world",
    "discover_world",
    "expand_nodelist",
    "hostfile_from_slurm",
    "init_distributed",
]
