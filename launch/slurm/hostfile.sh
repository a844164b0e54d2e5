#!/usr/bin/env bash
# Print a DeepSpeed hostfile ("host slots=N" per line) for the current SLURM allocation, for users
# who prefer `deepspeed --hostfile` (pdsh/ssh) to one srun task per GPU:
#
#   salloc --nodes=4 --gres=gpu:8 ...
#   launch/slurm/hostfile.sh --slots 8 > hostfile
#   deepspeed --hostfile hostfile -m pyramidion_ds.cli.train CONFIG.yaml
#
# Options: --nodelist LIST (default $SLURM_JOB_NODELIST), --slots N (default $SLURM_GPUS_ON_NODE,
# else $SLURM_NTASKS_PER_NODE). Names are expanded by `scontrol show hostnames`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m pyramidion_ds.distributed.hostfile "$@"
