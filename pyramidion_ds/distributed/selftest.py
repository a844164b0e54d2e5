"""Check a launch end to end without the trainer: discover the world, initialise torch.distributed
through DeepSpeed (nccl on CUDA machines, else gloo), all-reduce one tensor, and write what this
rank saw to OUT_DIR/rank{R}.json.

    srun python -m pyramidion_ds.distributed.selftest OUT_DIR        (or under mpiexec, torchrun, deepspeed)

Each rank contributes rank + 1, so the sum must be world_size·(world_size + 1)/2. Exit status 2 with
a one-line "error: ..." when the launch variables are inconsistent.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from pyramidion_ds.distributed.env import DistEnvError, init_distributed
from pyramidion_ds.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyramidion_ds.distributed.selftest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="where each rank writes rank{R}.json")
    parser.add_argument(
        "--backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo (as the trainer chooses)"
    )
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out_dir = args.out_dir
    setup_logging(rank=0)  # init_distributed itself logs on rank 0 only
    try:
        world = init_distributed(backend=args.backend, timeout_minutes=2)
    except DistEnvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging(rank=world.rank)

    import torch
    import torch.distributed as dist

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([float(world.rank + 1)], device=device)
    dist.all_reduce(value)
    record = dict(
        rank=world.rank,
        local_rank=world.local_rank,
        world_size=world.world_size,
        local_world_size=world.local_world_size,
        launcher=world.launcher,
        master_addr=world.master_addr,
        master_port=world.master_port,
        torch_rank=dist.get_rank(),
        torch_world_size=dist.get_world_size(),
        backend=backend,
        device=str(device),
        all_reduce_sum=value.item(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        slurm_nodename=os.environ.get("SLURMD_NODENAME"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{world.rank}.json").write_text(json.dumps(record, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
