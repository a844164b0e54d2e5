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
# OMP_NUM_THREADS: intra-op threads per process (default: this machine's cores / NUM_GPUS, at least 1);
# OMP_WAIT_POLICY (default PASSIVE: idle threads sleep instead of spinning).
# Extra options for the DeepSpeed launcher (e.g. --include localhost:2,3): DS_LAUNCHER_ARGS.
#
# Stopping: SIGTERM, SIGUSR1 or SIGINT to this script (or to its whole process group, as `timeout`
# and SLURM do, or to every process of the job at once, as a cgroup-wide kill or a container stop does)
# asks every rank to finish its update, save a checkpoint and exit 75; this script waits for them and
# exits 75 (rerun the same command to resume). A second Ctrl-C stops the ranks at once, without saving.
# The DeepSpeed launcher runs in a process group of its own with SIGUSR1 ignored: on SIGTERM it would
# kill the ranks 30 s later, saved or not, and exit 1. The ranks stop (without saving) when this
# script or the launcher dies, and rank 0 leaves its exit code in a file for this script, so a
# launcher killed by a signal (which DeepSpeed's runner reports as success) is not taken for one.
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
# intra-op threads: the cores each rank owns (torch's default is every core in every rank), sleeping rather
# than spinning at barriers (a machine loaded by other jobs otherwise slows much more); a value set wins
cores=$("$py" -c 'import os; print(len(os.sched_getaffinity(0)))' 2>/dev/null || nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NUM_GPUS > 0 ? cores / NUM_GPUS : 1 ))}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
port=${MASTER_PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
# Bad input (config, vocabulary, DeepSpeed JSON, data, run dir) is one line here, in seconds, not once per
# rank after the launcher and the ranks' start-up: the ranks check again, this only fails early.
"$py" -m pyramidion_ds.cli.train --check-only --world-size "$NUM_GPUS" "$@" || exit $?
echo "train.sh: $NUM_GPUS processes on $(hostname), master port $port, $py: $*"
export PYRAMIDION_LAUNCHER_PID=$$
PYRAMIDION_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/pyramidion-exit.XXXXXX")
export PYRAMIDION_EXIT_FILE
trap 'rm -f "$PYRAMIDION_EXIT_FILE"' EXIT
set -m  # the launcher's own process group
# shellcheck disable=SC2086  # DS_LAUNCHER_ARGS is a list of options on purpose
( trap '' USR1; exec "$py" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "$port" \
    ${DS_LAUNCHER_ARGS:-} --module pyramidion_ds.cli.train "$@" ) &
launcher=$!
set +m
stops=0
stop() {
  stops=$((stops + 1))
  if [ "$stops" -eq 1 ]; then
    echo "train.sh: received SIG$1: asking the ranks to save and stop (exit 75)" >&2
    kill -USR1 -- "-$launcher" 2>/dev/null || true
  elif [ "$1" = INT ]; then
    echo "train.sh: second SIGINT: stopping the ranks without saving" >&2
    kill -KILL -- "-$launcher" 2>/dev/null || true
  fi
}
trap 'stop TERM' TERM
trap 'stop USR1' USR1
trap 'stop INT' INT
set +e
while :; do
  wait "$launcher"
  rc=$?
  kill -0 "$launcher" 2>/dev/null || break  # else a trapped signal interrupted the wait
done
if [ "$stops" -gt 0 ] && [ ! -s "$PYRAMIDION_EXIT_FILE" ] && kill -0 -- "-$launcher" 2>/dev/null; then
  # the stop signal reached the launcher too (a cgroup-wide kill, a container stop): it died of it at once
  # (or stops the ranks 30 s later) while the ranks are still saving; their exit code is the job's
  echo "train.sh: the launcher exited ($rc) while the ranks save; waiting for them" >&2
  while [ ! -s "$PYRAMIDION_EXIT_FILE" ] && kill -0 -- "-$launcher" 2>/dev/null; do sleep 1; done
fi
if [ "$rc" -eq 0 ] && [ ! -s "$PYRAMIDION_EXIT_FILE" ]; then
  # DeepSpeed's runner reports a launcher killed by a signal as success while its ranks may still be
  # noticing their parent is gone (each writes its code as it exits): wait for them, a minute at most
  for _ in $(seq 60); do
    { [ -s "$PYRAMIDION_EXIT_FILE" ] || ! kill -0 -- "-$launcher" 2>/dev/null; } && break
    sleep 1
  done
fi
ranks=$(cat "$PYRAMIDION_EXIT_FILE" 2>/dev/null)
if [ "$stops" -gt 0 ] && [ -n "$ranks" ]; then
  rc=$ranks
elif [ "$rc" -eq 0 ] && [ "${ranks:-}" != 0 ]; then
  if [ -n "$ranks" ]; then what="exited with $ranks"; else what="did not finish"; fi
  echo "train.sh: the launcher reported success but rank 0 $what" >&2
  rc=${ranks:-1}
fi
exit "$rc"
