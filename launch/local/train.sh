#!/usr/bin/env bash
# pyramidion-train on this machine through the DeepSpeed launcher, one process per GPU.
#
#   NUM_GPUS=4 launch/local/train.sh CONFIG.yaml [--section.key VALUE ...]
#
# NUM_GPUS defaults to the GPUs nvidia-smi sees; without GPUs, NPROC CPU processes (default 2) run with
# DeepSpeed's CPU accelerator and gloo.
set -euo pipefail
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NUM_GPUS:-0}" -gt 0 ] || NUM_GPUS=${NPROC:-2}
fi
port=${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$port" --module pyramidion_ds.cli.train "$@"
