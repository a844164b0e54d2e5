#!/usr/bin/env bash
# The "pooling learns" experiment, as recorded in results/learn_*.md (README.md beside this file):
#   1. synthetic task, seed S, twice (the second run checks reproducibility), then a comparison;
#   2. the real samples in ../shared/data at a small step budget.
# Usage: tools/experiments/pooling_learns/run_learn.sh [extra run.py flags]   (env: OUT=results/learn SEED=1)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/../../.."
PY=${PYTHON:-python}
OUT=${OUT:-results/learn}
SEED=${SEED:-1}
$PY "$HERE/run.py" --task synthetic --seed "$SEED" --out "$OUT/synthetic-seed$SEED-a" "$@"
$PY "$HERE/run.py" --task synthetic --seed "$SEED" --out "$OUT/synthetic-seed$SEED-b" "$@"
$PY "$HERE/compare_learn.py" "$OUT/synthetic-seed$SEED-a" "$OUT/synthetic-seed$SEED-b" \
    | tee "$OUT/synthetic-seed$SEED-reproducibility.md"
$PY "$HERE/run.py" --task real --seed "$SEED" --out "$OUT/real-seed$SEED" "$@"
