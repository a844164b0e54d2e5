#!/usr/bin/env bash
# The "pooling learns" experiment (issue #9), as recorded in docs/results/learn_*.md:
#   1. synthetic task, seed S, twice (the second run checks reproducibility), then a comparison;
#   2. the real samples in ../shared/data at a small step budget.
# Usage: tools/experiments/run_learn.sh [OUT=results/learn] [SEED=1] [extra pyramidion-bench learn flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-results/learn}
SEED=${SEED:-1}
$PY -m pyramidion_ds.cli.bench learn --task synthetic --seed "$SEED" --out "$OUT/synthetic-seed$SEED-a" "$@"
$PY -m pyramidion_ds.cli.bench learn --task synthetic --seed "$SEED" --out "$OUT/synthetic-seed$SEED-b" "$@"
$PY tools/experiments/compare_learn.py "$OUT/synthetic-seed$SEED-a" "$OUT/synthetic-seed$SEED-b" \
    | tee "$OUT/synthetic-seed$SEED-reproducibility.md"
$PY -m pyramidion_ds.cli.bench learn --task real --seed "$SEED" --out "$OUT/real-seed$SEED" "$@"
