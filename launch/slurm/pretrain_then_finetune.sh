#!/usr/bin/env bash
# Submit denoising pretraining, then fine-tuning that starts from its weights once it finished OK.
#
#   launch/slurm/pretrain_then_finetune.sh PRETRAIN.yaml FINETUNE.yaml [sbatch options ...]
#
# Both jobs run launch/slurm/train.sbatch. The fine-tuning job waits for the pretraining job
# (--dependency=afterok:JOBID: it starts only if pretraining COMPLETED; a preempted and requeued
# pretraining keeps its job id, so the dependency follows it) and gets `--init-from PRETRAIN_RUN_DIR`
# (weights only; optimizer, schedule and update count start fresh), read from the pretraining
# config's train.save_dir. Extra arguments are sbatch options for both jobs, e.g.
#   launch/slurm/pretrain_then_finetune.sh pre.yaml fine.yaml --nodes=4 --time=48:00:00
# Set PYRAMIDION_PYTHON to the python that has pyramidion_ds (it reads the config here, and the jobs
# use it). Prints the two job ids and the pretraining run directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage="usage: pretrain_then_finetune.sh PRETRAIN.yaml FINETUNE.yaml [sbatch options ...]"
pretrain=${1:?$usage}
finetune=${2:?$usage}
shift 2
py=${PYRAMIDION_PYTHON:-python3}
for config in "$pretrain" "$finetune"; do
  case "$config" in
    */*|*.yaml|*.yml) [ -f "$config" ] || { echo "pretrain_then_finetune.sh: config '$config' does not exist" >&2; exit 2; } ;;
  esac
done
# train.save_dir of the pretraining config (relative paths are relative to this directory, where the
# jobs run too), as an absolute path.
run_dir=$("$py" -c '
import os, sys
from pyramidion_ds.config import load_config
print(os.path.abspath(load_config(sys.argv[1]).train.save_dir))' "$pretrain") || {
  echo "pretrain_then_finetune.sh: cannot read train.save_dir from '$pretrain' with $py (set PYRAMIDION_PYTHON)" >&2
  exit 2
}
first=$(sbatch --parsable --job-name=pyramidion-pretrain "$@" "$here/train.sbatch" "$pretrain")
first=${first%%;*}
second=$(sbatch --parsable --job-name=pyramidion-finetune --dependency="afterok:$first" "$@" \
         "$here/train.sbatch" "$finetune" --init-from "$run_dir")
second=${second%%;*}
echo "pretraining job $first -> $run_dir"
echo "fine-tuning job $second (starts after $first completes; --init-from $run_dir)"
