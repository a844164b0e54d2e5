#!/usr/bin/env bash
# pyramidion-train on this machine through the DeepSpeed launcher, one process per GPU.
#
#   launch/local/train.sh CONFIG.yaml [--section.key VALUE ...]
#   NUM_GPUS=4 launch/local/train.sh CONFIG.yaml ...          # the first 4 GPUs
#   NPROC=2 launch/local/train.sh debug                        # no GPU: 2 CPU processes (gloo)
#
# NUM_GPUS: processes, one per GPU; default: the GPUs nvidia-smi lists. Without GPUs, NPROC CPU
# processes (default 2) run with DeepSpeed's CPU accelerator and gloo.
# PYRAMIDION_PYTHON: the python that has pyramidion_ds and deepspeed (default python3 on PATH); the
# launcher starts every rank with it.
# MASTER_PORT: the rendezvous port (default: a free one).
# Extra options for the DeepSpeed launcher (e.g. --include localhost:2,3): DS_LAUNCHER_ARGS.
set -euo pipefail
py=${PYRAMIDION_PYTHON:-python3}
command -v "$py" >/dev/null 2>&1 || { echo "train.sh: error: PYRAMIDION_PYTHON='$py' is not an executable" >&2; exit 2; }
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NUM_GPUS:-0}" -gt 0 ] || NUM_GPUS=${NPROC:-2}
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
  # CPU processes: tell DeepSpeed so (no "unable to detect" GPU warning from each process), and keep the
  # launcher's GPU-cluster lines (CUDA_VISIBLE_DEVICES=0,1, "Unable to find hostfile") quiet; the ranks'
  # own warnings still show. A --log_level in DS_LAUNCHER_ARGS comes later and wins.
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  DS_LAUNCHER_ARGS="--log_level error ${DS_LAUNCHER_ARGS:-}"
fi
port=${MASTER_PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
echo "train.sh: $NUM_GPUS processes on $(hostname), master port $port, $py: $*"
# shellcheck disable=SC2086  # DS_LAUNCHER_ARGS is a list of options on purpose
exec "$py" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "$port" ${DS_LAUNCHER_ARGS:-} \
  --module pyramidion_ds.cli.train "$@"
