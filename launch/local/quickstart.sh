#!/usr/bin/env bash
# The quick start: set up ./.venv, make the built-in synthetic corpus (short documents of office filler with
# 2-4 planted sentences; the summary is those sentences), then the whole pipeline on it:
#   preprocess -> train a Pyramidion (pyramidion_ds/configs/quickstart.yaml) on 2 local processes through
#   the DeepSpeed launcher -> generate the test split with beam search, ROUGE, two examples, an --explain page.
# Under 8 minutes on an idle 2-core CPU with a fresh .venv (2-3 of them installing torch and DeepSpeed),
# about 210 CPU-seconds of work after that. Run it again and it reuses the corpus, the vocabulary and the
# finished run, and generates again. It exits 1 when the model did not learn (ROUGE-L under 50).
#
# Writes data/synthetic/ (corpus), data-bin/synthetic/ (vocabulary + shards), runs/quickstart/ (checkpoints,
# tensorboard, train.log, generate/). NPROC=1 trains in one process instead of two.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
started=$SECONDS
bash launch/local/setup_env.sh || exit 1
export PATH=$root/.venv/bin:$PATH
export PYRAMIDION_PYTHON=$root/.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per process: 2 processes fill a 2-core machine

corpus=data/synthetic
data_bin=data-bin/synthetic
run=runs/quickstart
results=$run/generate
# what steps 1-2 make; a corpus or data-bin made with other settings (an older quick start) is made anew
corpus_args=(--out "$corpus" --train 4000 --valid 20 --test 20 --min-words 60 --max-words 100
             --min-salient 2 --max-salient 4)
preprocess_args=(--destdir "$data_bin" --overwrite --workers 2 --quiet
                 --source-files "train=$corpus/train.jsonl,valid=$corpus/valid.jsonl,test=$corpus/test.jsonl"
                 --spm-vocab-size 1000 --spm-model-type bpe --spm-character-coverage 1.0
                 --max-source-positions 256 --max-target-positions 64)
stamp="${corpus_args[*]} | ${preprocess_args[*]}"

step() {  # step N TOTAL DESCRIPTION -- command...
  local n=$1 total=$2 what=$3; shift 4
  echo "== quick start [$n/$total] $what ($((SECONDS - started)) s so far)"
  "$@"; local rc=$?
  if [ $rc -ne 0 ]; then
    echo "== quick start failed at step $n/$total ($what), exit code $rc" >&2
    exit $rc
  fi
}

if [ -f "$data_bin/meta.json" ] && [ "$(cat "$data_bin/.quickstart" 2>/dev/null)" = "$stamp" ]; then
  echo "== quick start [1-2/4] corpus and vocabulary: reusing $corpus and $data_bin"
else
  rm -f "$data_bin/.quickstart"
  step 1 4 "synthetic corpus -> $corpus" -- python tools/make_synthetic_corpus.py "${corpus_args[@]}"
  step 2 4 "sentencepiece + binarize -> $data_bin" -- pyramidion-preprocess "${preprocess_args[@]}"
  echo "$stamp" > "$data_bin/.quickstart"
fi
# resumes from $run/checkpoints when it has some; a finished run stops at once
step 3 4 "training (${NPROC:-2} processes, 1,000 updates) -> $run" -- \
  env NPROC="${NPROC:-2}" bash launch/local/train.sh quickstart --data.data "$data_bin" --train.save_dir "$run"
step 4 4 "generation + ROUGE on the test split -> $results" -- \
  pyramidion-generate "$run" --gen-subset test --results-path "$results" --explain 2 --no-progress-bar

# two examples beside their references; exit 1 when the model did not learn (ROUGE-L < 50)
python - "$results" "$run" <<'EOF' || exit 1
import json, sys
from pathlib import Path
out, run = Path(sys.argv[1]), sys.argv[2]
hyps = (out / "test.hyp").read_text(encoding="utf-8").splitlines()
refs = (out / "test.ref").read_text(encoding="utf-8").splitlines()
rouge_l = 100 * json.loads((out / "rouge-test.json").read_text())["rougeL"]["fmeasure"]
print(f"\nROUGE-L {rouge_l:.1f} on {len(refs)} test documents (the planted sentences recovered in order "
      "score close to 100; a model that has not learned to copy them, about 20)")
for i in range(min(2, len(refs))):
    print(f"\ntest document {i}\n  reference : {refs[i]}\n  hypothesis: {hyps[i]}")
print(f"\nWhat the encoder kept of test document 0 (open in a browser): {out / 'explain-test' / '000000.html'}")
if rouge_l < 50:
    print(f"\n== quick start: ROUGE-L {rouge_l:.1f}, expected >= 50: the model did not learn to copy the planted "
          f"sentences; see {run}/train.log (its valid nll should fall below 0.3)", file=sys.stderr)
    sys.exit(1)
EOF
echo
echo "== quick start done in $((SECONDS - started)) s: run dir $run (curves: tensorboard --logdir $run/tensorboard)"
echo "   For pyramidion-train, tensorboard, python tools/... and the README's other commands, first run:"
echo "   source .venv/bin/activate"
