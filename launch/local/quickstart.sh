#!/usr/bin/env bash
# The quick start: set up ./.venv, make the built-in synthetic corpus, then run the whole pipeline on
# it: preprocess -> train the debug model on 2 local processes (DeepSpeed launcher) -> generate + ROUGE.
# About 3-5 minutes on a 2-core CPU.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bash launch/local/setup_env.sh || exit 1
export PATH=$root/.venv/bin:$PATH

step() {  # step N TOTAL DESCRIPTION -- command...
  local n=$1 total=$2 what=$3; shift 4
  echo "== quick start [$n/$total] $what"
  "$@"; local rc=$?
  if [ $rc -ne 0 ]; then
    echo "== quick start failed at step $n/$total ($what), exit code $rc" >&2
    exit $rc
  fi
}

step 1 4 "synthetic corpus" -- python tools/make_synthetic_corpus.py --out data/synthetic \
  --train 400 --valid 20 --test 20 --min-words 300 --max-words 450
step 2 4 "preprocessing" -- pyramidion-preprocess --destdir data-bin/synthetic --workers 2 \
  --source-files train=data/synthetic/train.jsonl,valid=data/synthetic/valid.jsonl,test=data/synthetic/test.jsonl \
  --spm-vocab-size 256 --max-source-positions 1024 --max-target-positions 128
step 3 4 "training" -- env NPROC=2 bash launch/local/train.sh debug
step 4 4 "generation" -- pyramidion-generate runs/debug --gen-subset test --results-path runs/debug/generate
echo "== quick start done: run dir runs/debug (tensorboard --logdir runs/debug/tensorboard),"
echo "   summaries and ROUGE in runs/debug/generate"
