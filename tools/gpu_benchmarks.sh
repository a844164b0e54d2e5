#!/usr/bin/env bash
# Run the GPU benchmarks and GPU tests, one JSON (or text) file each, into OUT (default results/gpu).
#   OUT=results/gpu bash tools/gpu_benchmarks.sh [STEP ...]   (default: every step)
# Steps: tests_gpu topk topk_profile encoder encoder_compile train train_compile train_overflow train_compile_overflow
#        generate generate_hard calibrate.
# Each has its own time limit so one slow step cannot starve the rest.
set -u
out=${OUT:-results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
wanted=" ${*:-tests_gpu topk topk_profile encoder encoder_compile train train_compile train_overflow train_compile_overflow generate generate_hard calibrate} "
step() {  # step NAME SECONDS -- command...
  local name=$1 limit=$2; shift 3
  [[ $wanted == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.json" 2>> "$out/stderr.log"
  echo "$name: exit $? in $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/device.txt" 2>&1
step tests_gpu 240 -- "$py" -m pytest -q tests/gpu -p no:cacheprovider -rs
# topk: torch path (eager, compiled) and the Triton kernels, first call compiling them; topk_profile: Triton's
step topk 240 -- "$py" -m pyramidion_ds.cli.bench topk --device cuda --dtype bf16 --compile
step topk_profile 120 -- "$py" -m pyramidion_ds.cli.bench topk --device cuda --dtype bf16 --shape 8x8192x2048x512 \
  --profile --backend triton
step encoder 150 -- "$py" -m pyramidion_ds.cli.bench encoder --device cuda --dtype bf16 --lengths 8192,16384 \
  --batch-size 8 --repeats 5 --warmup 2 --variants vanilla,blockwise,pyramidion,pyramidion_default_schedule
step encoder_compile 200 -- "$py" -m pyramidion_ds.cli.bench encoder --device cuda --dtype bf16 --lengths 8192 \
  --batch-size 8 --repeats 5 --warmup 3 --variants blockwise,pyramidion,pyramidion_default_schedule --compile
step train 200 -- "$py" -m pyramidion_ds.cli.bench train --preset base --src-len 8192 --tgt-len 256 --batch 4 \
  --precision bf16 --stages 2 --variants vanilla blockwise pyramidion --vocab 32000 --steps 5 --warmup 3
step train_compile 240 -- "$py" -m pyramidion_ds.cli.bench train --preset base --src-len 8192 --tgt-len 256 --batch 4 \
  --precision bf16 --stages 2 --variants vanilla pyramidion --vocab 32000 --steps 5 --warmup 3 --compile
step train_overflow 240 -- "$py" -m pyramidion_ds.cli.bench train --preset base --src-len 8192 --tgt-len 256 --batch 4 \
  --precision bf16 --stages 2 --variants vanilla blockwise pyramidion --vocab 32000 --steps 5 --warmup 3 \
  --overflow-check both --profile 4
step train_compile_overflow 240 -- "$py" -m pyramidion_ds.cli.bench train --preset base --src-len 8192 --tgt-len 256 \
  --batch 4 --precision bf16 --stages 2 --variants vanilla pyramidion --vocab 32000 --steps 5 --warmup 3 --compile \
  --overflow-check off
step generate 150 -- "$py" -m pyramidion_ds.cli.bench generate --device cuda --dtype bf16 --repeats 3
step generate_hard 90 -- "$py" -m pyramidion_ds.cli.bench generate --device cuda --dtype bf16 --repeats 3 \
  --hard-topk --skip-exactness --skip-nocache --skip-hf
step calibrate 150 -- "$py" -m pyramidion_ds.tune.calibrate --device cuda --dtype bf16
