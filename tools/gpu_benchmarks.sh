#!/usr/bin/env bash
# One prepared GPU run, inside 8 minutes on one GPU: the GPU tests, then the top-k, encoder and training
# benchmarks. Each step writes OUT/STEP.json (the tests: OUT/tests_gpu.txt); OUT/device.json names the
# GPU; OUT/summary.json gives every step's exit code and seconds.
#   OUT=results/gpu bash tools/gpu_benchmarks.sh [--dry-run] [STEP ...]
# Default steps: tests_gpu topk encoder train train_compile. Run only when named (they do not fit the 8
# minutes together with the defaults): topk_profile encoder_compile train_overflow generate generate_hard
# calibrate.
# --dry-run prints the planned commands with their time limits and runs nothing.
# Each step has its own time limit, and no step runs past the whole budget (BUDGET_S, default 470 s), so
# one slow step cannot eat the others' time; the train step writes its JSON after every row, so a step
# cut short still leaves what it measured.
set -u
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
out=${OUT:-results/gpu}
py=${PYTHON:-python3}
budget=${BUDGET_S:-470}
steps="tests_gpu topk encoder train train_compile"
optional="topk_profile encoder_compile train_overflow generate generate_hard calibrate"
wanted=" ${*:-$steps} "
for name in $wanted; do
  if [[ " $steps $optional " != *" $name "* ]]; then
    echo "gpu_benchmarks: unknown step '$name', expected some of: $steps $optional" >&2
    exit 2
  fi
done
started=$SECONDS
summary=""
step() {  # step NAME SECONDS -- command...
  local name=$1 limit=$2; shift 3
  [[ $wanted == *" $name "* ]] || return 0
  local left=$((budget - (SECONDS - started)))
  (( limit > left )) && limit=$left
  if (( dry )); then echo "$name (limit ${limit}s): $*"; return 0; fi
  if (( limit < 20 )); then
    echo "$name: skipped, the budget of ${budget}s is spent"
    summary+="\"$name\": {\"skipped\": \"budget spent\"}, "
    return 0
  fi
  local file="$out/$name.json" start=$SECONDS
  [[ $name == tests_* ]] && file="$out/$name.txt"
  timeout "$limit" "$@" > "$file" 2>> "$out/stderr.log"
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (limit ${limit}s)"
  summary+="\"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit}, "
}
if (( ! dry )); then
  mkdir -p "$out"
  "$py" -c "import json, torch; print(json.dumps({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__,
 'cuda': torch.version.cuda}))" > "$out/device.json" 2>> "$out/stderr.log"
fi

# base model, bf16, the shipped DeepSpeed configs (ds_configs/zero2_bf16.json, zero3_bf16.json); 32,768
# source tokens a step: batch 4 at 8k, 2 at 16k
train=(-m pyramidion_ds.cli.bench train --preset base --tokens 32768 --tgt-len 256 --precision bf16 --vocab 32000
       --steps 3 --warmup 2)
# the GPU tests compile the Triton top-k kernels first (40-90 s for the 8192-lane rounds kernel); Triton
# caches them, so the top-k benchmark after it times the torch path and the kernels without compiling
step tests_gpu 120 -- "$py" -m pytest -q tests/gpu -p no:cacheprovider -rs
step topk 40 -- "$py" -m pyramidion_ds.cli.bench topk --device cuda --dtype bf16
step encoder 50 -- "$py" -m pyramidion_ds.cli.bench encoder --device cuda --dtype bf16 --lengths 8192,16384 \
  --batch-size 4 --repeats 3 --warmup 2 --variants vanilla,blockwise,pyramidion
step train 170 -- "$py" "${train[@]}" --src-len 8192 16384 --stages 2 3 --variants vanilla blockwise pyramidion \
  --output "$out/train.json"
step train_compile 90 -- "$py" "${train[@]}" --src-len 8192 --stages 2 --variants pyramidion --compile \
  --output "$out/train_compile.json"
# only when named
step topk_profile 120 -- "$py" -m pyramidion_ds.cli.bench topk --device cuda --dtype bf16 --shape 8x8192x2048x512 \
  --profile --backend triton
step encoder_compile 200 -- "$py" -m pyramidion_ds.cli.bench encoder --device cuda --dtype bf16 --lengths 8192 \
  --batch-size 8 --repeats 5 --warmup 3 --variants blockwise,pyramidion,pyramidion_default_schedule --compile
step train_overflow 240 -- "$py" "${train[@]}" --src-len 8192 --stages 2 --variants vanilla blockwise pyramidion \
  --overflow-check both --profile 4 --output "$out/train_overflow.json"
step generate 150 -- "$py" -m pyramidion_ds.cli.bench generate --device cuda --dtype bf16 --repeats 3
step generate_hard 90 -- "$py" -m pyramidion_ds.cli.bench generate --device cuda --dtype bf16 --repeats 3 \
  --hard-topk --skip-exactness --skip-nocache --skip-hf
step calibrate 150 -- "$py" -m pyramidion_ds.tune.calibrate --device cuda --dtype bf16

if (( ! dry )); then
  echo "{${summary%, }}" > "$out/summary.json"
  echo "total $((SECONDS - started)) s of ${budget}s; results in $out"
fi
