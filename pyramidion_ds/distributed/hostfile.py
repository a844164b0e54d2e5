"""Print a DeepSpeed hostfile (`host slots=N` per line) for a SLURM allocation, for users who launch
with `deepspeed --hostfile` (pdsh/ssh) inside `salloc`/`sbatch` instead of one `srun` task per GPU.
The work is `pyramidion_ds.distributed.env.hostfile_from_slurm`; `launch/slurm/hostfile.sh` wraps this.

    python -m pyramidion_ds.distributed.hostfile [--nodelist LIST] [--slots N] > hostfile
"""

from __future__ import annotations

import argparse
import os
import sys

from pyramidion_ds.distributed.env import DistEnvError, hostfile_from_slurm


def _default_slots(env) -> int | None:
    # GPUs allocated on this node, else the tasks per node the job asked for.
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyramidion_ds.distributed.hostfile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nodelist",
        default=os.environ.get("SLURM_JOB_NODELIST"),
        help="SLURM node list (default: $SLURM_JOB_NODELIST)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=_default_slots(os.environ),
        help="processes per host (default: $SLURM_GPUS_ON_NODE, else $SLURM_NTASKS_PER_NODE)",
    )
    args = parser.parse_args(argv)
    if not args.nodelist:
        parser.error("no node list: pass --nodelist or run inside a SLURM allocation (SLURM_JOB_NODELIST)")
    if args.slots is None:
        parser.error("no slot count: pass --slots (neither SLURM_GPUS_ON_NODE nor SLURM_NTASKS_PER_NODE is set)")
    try:
        sys.stdout.write(hostfile_from_slurm(args.nodelist, args.slots))
    except DistEnvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
