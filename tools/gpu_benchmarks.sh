#!/usr/bin/env bash
# One prepared GPU run that always returns figures, inside 8 minutes on one GPU.
#   OUT=results/gpu bash tools/gpu_benchmarks.sh [--dry-run] [--cpu-miniature] [STEP ...]
# Default steps, in order:
#   env                 imports and versions (torch, CUDA, GPU, Triton, DeepSpeed, FusedAdam or its fallback,
#                       built here once) -> OUT/env.json
#   precompile          the Triton top-k kernels compiled once, up front; their compile time is reported
#                       here on its own (OUT/precompile.json), never inside a measurement
#   topk                the top-k benchmark, eager and under torch.compile
#   encoder             encoder forward+backward at 8k, 16k, 32k, 64k: blockwise, the halving pyramidion
#                       and the default (training) schedule beside it
#   train               DeepSpeed training steps, base in bf16, ZeRO-2 and 3, 8k and 16k, three variants
#   train_graphs        the pyramidion's training step under torch.compile mode reduce-overhead (CUDA graphs)
#   generate_variants   issue 28: pyramidion vs blockwise vs vanilla summarizing, bf16, CUDA graphs as shipped
#   tests_gpu           the GPU tests (OUT/logs/tests_gpu.log), with whatever time is left
# Only when named: topk_profile encoder_compile train_overflow generate generate_hard calibrate.
#
# Every benchmark writes its JSON itself (--output OUT/STEP.json), rewritten atomically after every row,
# so a step cut short by its limit, or one that crashes half-way, leaves valid JSON with the rows it
# measured; stdout and stderr go to OUT/logs/STEP.log, so a stray print cannot corrupt a JSON file.
# OUT/summary.json (rewritten after every step) gives each step's exit code, seconds and limit.
#
# Time: each step has its own limit and no step runs past the whole budget (BUDGET_S, default 480 s), so
# one slow step cannot eat the others' time. The limits hold the compiles they pay: the Triton kernels
# are compiled by `precompile` only (Triton's cache serves every later process), FusedAdam's JIT build
# (about a minute) by `env`, and the torch.compile steps (topk, train_graphs) compile in their untimed
# warm-up, inside their limit.
#
# --dry-run prints the planned commands with their time limits and runs nothing. --cpu-miniature (or
# MINI=1) runs every step on the CPU at toy sizes, the top-k in Triton's interpreter and torch.compile
# disabled (TORCHDYNAMO_DISABLE=1: the compile steps run their command path eagerly): what the tests run.
# On the GPU machine, wheels carried in .whl/ (../shared/gpu/make_wheels.sh: DeepSpeed) are installed into
# OUT/site first, and TORCH_CUDA_ARCH_LIST=9.0a (which breaks DeepSpeed's op builder) becomes 9.0.
set -u
dry=0
mini=${MINI:-0}
while [[ ${1:-} == --* ]]; do
  case $1 in
    --dry-run) dry=1 ;;
    --cpu-miniature) mini=1 ;;
    *) echo "gpu_benchmarks: unknown option '$1', expected --dry-run or --cpu-miniature" >&2; exit 2 ;;
  esac
  shift
done
out=${OUT:-results/gpu}
py=${PYTHON:-python3}
budget=${BUDGET_S:-480}
# the limits below are the GPU's; the CPU miniature interprets the kernels on a machine that may be shared,
# so its limits are LIMIT_SCALE (default 4) times longer
scale=1
(( mini )) && scale=${LIMIT_SCALE:-4}
budget=$((budget * scale))
steps="env precompile topk encoder train train_graphs generate_variants tests_gpu"
optional="topk_profile encoder_compile train_overflow generate generate_hard calibrate"
wanted=" ${*:-$steps} "
for name in $wanted; do
  if [[ " $steps $optional " != *" $name "* ]]; then
    echo "gpu_benchmarks: unknown step '$name', expected some of: $steps $optional" >&2
    exit 2
  fi
done

started=$SECONDS
planned=0
summary=""
write_summary() {  # atomically: a reader never sees half a file
  printf '{%s}\n' "${summary%, }" > "$out/.summary.json.tmp" && mv -f "$out/.summary.json.tmp" "$out/summary.json"
}
step() {  # step NAME SECONDS -- command...
  local name=$1 limit=$(($2 * scale)); shift 3
  [[ $wanted == *" $name "* ]] || return 0
  local left
  if (( dry )); then left=$((budget - planned)); else left=$((budget - (SECONDS - started))); fi
  (( limit > left )) && limit=$left
  if (( dry )); then
    planned=$((planned + limit))
    echo "$name (limit ${limit}s): $*"
    return 0
  fi
  if (( limit < 20 )); then
    echo "$name: skipped, the budget of ${budget}s is spent"
    summary+="\"$name\": {\"skipped\": \"budget spent\"}, "
    write_summary
    return 0
  fi
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (limit ${limit}s)"
  summary+="\"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit}, "
  write_summary
}

bench=(-m pyramidion_ds.cli.bench)
if (( mini )); then
  # toy sizes on the CPU: the same commands, options and output paths as on the GPU
  export TRITON_INTERPRET=1 TORCHDYNAMO_DISABLE=1
  dev=(--device cpu --dtype fp32)
  topk_shape=(--shape 2x256x64x16 --repeats 1 --warmup 0 --no-reference)
  encoder=(--preset debug --lengths 128,256 --batch-size 1 --repeats 1 --warmup 0)
  train=(--preset debug --batch 2 --tgt-len 16 --vocab 100 --precision fp32 --steps 1 --warmup 0)
  train_lengths=(--src-len 128 --stages 2)
  train_graphs_length=(--src-len 128)
  generate=(--preset debug --vocab 100 --batch 1 --beam 2 --new-tokens 4 --src-len 256 --repeats 1)
else
  dev=(--device cuda --dtype bf16)
  topk_shape=()
  encoder=(--preset base --lengths 8192,16384,32768,65536 --batch-size 2 --repeats 3 --warmup 2)
  # base model, bf16, the shipped DeepSpeed configs (ds_configs/zero2_bf16.json, zero3_bf16.json); 32,768
  # source tokens a step: batch 4 at 8k, 2 at 16k
  train=(--preset base --tokens 32768 --tgt-len 256 --precision bf16 --vocab 32000 --steps 6 --warmup 2)
  train_lengths=(--src-len 8192 16384 --stages 2 3)
  train_graphs_length=(--src-len 8192)
  generate=()
fi

if (( ! dry )); then
  mkdir -p "$out/logs"
  if (( ! mini )) && compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$out/site" .whl/*.whl \
      > "$out/logs/wheels.log" 2>&1 || echo "gpu_benchmarks: the wheels in .whl did not install (logs/wheels.log)"
    export PYTHONPATH="$out/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  [[ ${TORCH_CUDA_ARCH_LIST:-} == 9.0a ]] && export TORCH_CUDA_ARCH_LIST=9.0
  write_summary
fi

# every import, version and fallback first, each written as it is found: env.json says what failed. The
# limit holds FusedAdam's JIT build (about a minute, ../shared/gpu/README.md): cut short, it would leave its
# build lock for the train steps to wait on
step env 90 -- "$py" -m pyramidion_ds.bench.env --output "$out/env.json"
# the kernels' compile budget is 20 s each on one core (issue 24); they compile here and nowhere else
step precompile 60 -- "$py" "${bench[@]}" topk --precompile "${dev[@]}" --output "$out/precompile.json"
step topk 30 -- "$py" "${bench[@]}" topk "${dev[@]}" "${topk_shape[@]}" --compile --output "$out/topk.json"
step encoder 50 -- "$py" "${bench[@]}" encoder "${dev[@]}" "${encoder[@]}" \
  --variants blockwise,pyramidion,pyramidion_default_schedule --output "$out/encoder.json"
step train 90 -- "$py" "${bench[@]}" train "${train[@]}" "${train_lengths[@]}" --variants vanilla blockwise pyramidion \
  --output "$out/train.json"
step train_graphs 70 -- "$py" "${bench[@]}" train "${train[@]}" "${train_graphs_length[@]}" --stages 2 \
  --variants pyramidion --compile --compile-mode reduce-overhead --output "$out/train_graphs.json"
step generate_variants 60 -- "$py" "${bench[@]}" generate --variants pyramidion,blockwise,vanilla "${dev[@]}" \
  "${generate[@]}" --output "$out/generate_variants.json"
step tests_gpu 30 -- "$py" -m pytest -q tests/gpu -p no:cacheprovider -rs
# only when named
step topk_profile 120 -- "$py" "${bench[@]}" topk "${dev[@]}" --shape 8x8192x2048x512 --profile --backend triton
step encoder_compile 200 -- "$py" "${bench[@]}" encoder "${dev[@]}" "${encoder[@]}" \
  --variants blockwise,pyramidion,pyramidion_default_schedule --compile --output "$out/encoder_compile.json"
step train_overflow 240 -- "$py" "${bench[@]}" train "${train[@]}" "${train_graphs_length[@]}" --stages 2 \
  --variants vanilla blockwise pyramidion --overflow-check both --profile 4 --output "$out/train_overflow.json"
step generate 150 -- "$py" "${bench[@]}" generate "${dev[@]}" "${generate[@]}" --output "$out/generate.json"
step generate_hard 90 -- "$py" "${bench[@]}" generate "${dev[@]}" "${generate[@]}" --hard-topk --skip-exactness \
  --skip-nocache --skip-hf --output "$out/generate_hard.json"
step calibrate 150 -- "$py" -m pyramidion_ds.tune.calibrate "${dev[@]}"

if (( ! dry )); then
  echo "total $((SECONDS - started)) s of ${budget}s; results in $out"
fi
