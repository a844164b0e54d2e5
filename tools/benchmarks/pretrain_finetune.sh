#!/usr/bin/env bash
# SumPubMed on CPU (../shared/data/sumpubmed: 2,000 + 100 BMC articles, median ~4,000 words, with abstracts),
# through the commands of the README and docs/pretraining.md as a user runs them:
#   1. gap-sentence pretraining (PEGASUS) on the 2,000 articles without abstracts for P updates, then
#      fine-tuning for F updates (--init-from), against training from scratch for P + F updates: the same
#      total number of updates, on LABELED article/abstract pairs (default: all 2,000);
#   2. pyramidion against blockwise, both from scratch for P + F updates: validation loss at the same updates,
#      and the training step time of the two models measured in one process (pyramidion-bench train);
#   3. summaries of the first 20 validation articles by the two pyramidion models: ROUGE, and unknown pieces.
# Validation is always the 100 validation pairs. Prints one JSON object at the end and writes it to
# $WORK/results.json. Reruns reuse what is complete.
#
#   bash tools/benchmarks/pretrain_finetune.sh      # P=200 F=200, all pairs: about 30 min on a 2-core CPU
#   LABELED=200 PRETRAIN_UPDATES=400 FINETUNE_UPDATES=400 BLOCKWISE=0 WORK=runs/bench-sumpubmed-200 \
#       bash tools/benchmarks/pretrain_finetune.sh  # few labeled pairs, as when pretraining pays: about 35 min
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
data=${SUMPUBMED:-$root/../shared/data/sumpubmed}
work=${WORK:-$root/runs/bench-sumpubmed}
P=${PRETRAIN_UPDATES:-200}
F=${FINETUNE_UPDATES:-200}
LABELED=${LABELED:-all}
BLOCKWISE=${BLOCKWISE:-1}
[ -f "$data/train.jsonl.gz" ] && [ -f "$data/valid.jsonl.gz" ] || {
  echo "pretrain_finetune.sh: error: $data/{train,valid}.jsonl.gz not found; set SUMPUBMED to the SumPubMed folder" >&2
  exit 2
}
export PATH=$root/.venv/bin:$PATH PYRAMIDION_PYTHON=${PYRAMIDION_PYTHON:-$root/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} NPROC=${NPROC:-2}
mkdir -p "$work" && cd "$work"
ln -sfn "$root/ds_configs" ds_configs
started=$SECONDS
say() { echo "== sumpubmed [$((SECONDS - started)) s] $*"; }

# One vocabulary, two data-bins (docs/pretraining.md): the documents alone, then the pairs with its spm.model
if [ ! -f data-bin/sumpubmed-pretrain/meta.json ]; then
  say "preprocess: documents only, 8,000-piece vocabulary with byte fallback -> data-bin/sumpubmed-pretrain"
  pyramidion-preprocess --source-files "train=$data/train.jsonl.gz,valid=$data/valid.jsonl.gz" --unlabeled \
    --spm-vocab-size 8000 --spm-sentinels 100 --max-source-positions 4096 --max-target-positions 512 \
    --spm-user-symbols "<mask>,▁<dig>,▁<cit>,<dig>,<cit>,▁BACKGROUND,▁RESULTS,▁CONCLUSIONS" \
    --destdir data-bin/sumpubmed-pretrain --quiet
fi
if [ "$LABELED" = all ] && [ ! -f data-bin/sumpubmed/meta.json ]; then
  say "preprocess: articles + abstracts with that vocabulary -> data-bin/sumpubmed"
  pyramidion-preprocess --source-files "train=$data/train.jsonl.gz,valid=$data/valid.jsonl.gz" \
    --spm-model data-bin/sumpubmed-pretrain/spm.model --max-source-positions 4096 --max-target-positions 512 \
    --destdir data-bin/sumpubmed --quiet
fi

labeled=data-bin/sumpubmed
if [ "$LABELED" != all ]; then  # the first LABELED pairs (the pretraining corpus keeps all 2,000 articles)
  labeled=data-bin/sumpubmed-$LABELED
  if [ ! -f "$labeled/meta.json" ]; then
    say "preprocess: the first $LABELED articles + abstracts -> $labeled"
    python - "$data/train.jsonl.gz" "$LABELED" <<'PY'
import gzip, sys
with gzip.open(sys.argv[1], "rt", encoding="utf-8") as src, open("train-labeled.jsonl", "w", encoding="utf-8") as out:
    for _, line in zip(range(int(sys.argv[2])), src):
        out.write(line)
PY
    pyramidion-preprocess --source-files "train=train-labeled.jsonl,valid=$data/valid.jsonl.gz" \
      --spm-model data-bin/sumpubmed-pretrain/spm.model --max-source-positions 4096 --max-target-positions 512 \
      --destdir "$labeled" --quiet
  fi
fi

train() {  # train NAME CONFIG ARGS...: a run that finished already returns at once (it resumes at max_update)
  local name=$1 config=$2; shift 2
  say "train $name: $*"
  bash "$root/launch/local/train.sh" "$config" --train.save_dir "runs/$name" --train.validate_interval_updates 100 \
    "$@" > "$name.out" 2>&1 || { tail -20 "$name.out" >&2; exit 1; }
}
train pretrain sumpubmed_pretrain --train.max_update "$P"
train finetune sumpubmed_finetune --data.data "$labeled" --train.max_update "$F" --init-from runs/pretrain
train scratch sumpubmed_finetune --data.data "$labeled" --train.max_update $((P + F))
if [ "$BLOCKWISE" = 1 ]; then
  train blockwise sumpubmed_finetune --data.data "$labeled" --train.max_update $((P + F)) \
    --model.variant blockwise --model.pooling_schedule null
fi

say "generate: the first 20 validation articles, finetune and scratch"
python - "$data/valid.jsonl.gz" <<'PY'
import gzip, json, sys
with gzip.open(sys.argv[1], "rt", encoding="utf-8") as src, open("valid20.jsonl", "w", encoding="utf-8") as out:
    for _, line in zip(range(20), src):
        out.write(line)
PY
for name in finetune scratch; do
  [ -f "gen-$name/rouge-valid20.json" ] || pyramidion-generate "runs/$name" --input valid20.jsonl --results-path "gen-$name" \
    --beam 2 --max-len-b 511 --no-repeat-ngram-size 3 --no-progress-bar > "gen-$name.out" 2>&1 \
    || { tail -20 "gen-$name.out" >&2; exit 1; }
done

say "step time: pyramidion and blockwise of this config, one process, same batches"
model_args=$(python - "$root/pyramidion_ds/configs/sumpubmed_finetune.yaml" <<'PY'
import sys, yaml
m = yaml.safe_load(open(sys.argv[1]))["model"]
keys = ("d_model", "num_heads", "ffn_dim", "encoder_layers", "decoder_layers", "chunk_size", "pooling_schedule")
print(" ".join(f"--model.{k} {str(m[k]).replace(' ', '')}" for k in keys))
PY
)
[ "$BLOCKWISE" != 1 ] || [ -f step_time.json ] || pyramidion-bench train --preset debug --src-len 4096 --tgt-len 512 --batch 1 \
  --variants blockwise pyramidion --stages 2 --precision fp32 --vocab 8000 $model_args \
  --output step_time.json \
  > step_time.out 2>&1 || { tail -20 step_time.out >&2; exit 1; }

python - "$P" "$F" "$LABELED" <<'PY'
import json, re, sys
from pathlib import Path
P, F, labeled = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def valid(name):  # {update: nll} from the run's train.log
    pattern = re.compile(r"valid \| update (\d+) \| loss [\d.]+ \| nll ([\d.]+)")
    return {int(m[1]): float(m[2]) for m in pattern.finditer(Path(f"runs/{name}/train.log").read_text())}
runs = {name: valid(name) for name in ("pretrain", "finetune", "scratch", "blockwise")
        if Path(f"runs/{name}/train.log").exists()}
end = P + F
result = {"pretrain_updates": P, "finetune_updates": F, "labeled_pairs": labeled, "valid_nll": runs}
result["pretrain_then_finetune_nll"] = runs["finetune"][F]
result["scratch_nll"] = runs["scratch"][end]
result["pretraining_helps"] = runs["finetune"][F] < runs["scratch"][end]
if "blockwise" in runs:
    result["blockwise_nll"] = runs["blockwise"][end]
    result["pyramidion_vs_blockwise_nll"] = runs["scratch"][end] / runs["blockwise"][end]
    rows = json.loads(Path("step_time.json").read_text())["rows"]
    tokens_per_s = {row["variant"]: row["tokens_per_s"] for row in rows}
    result["train_tokens_per_s"] = tokens_per_s
    result["pyramidion_vs_blockwise_step_time"] = tokens_per_s["blockwise"] / tokens_per_s["pyramidion"]
for name in ("finetune", "scratch"):
    hyps = Path(f"gen-{name}/valid20.hyp").read_text(encoding="utf-8")
    rouge = json.loads(Path(f"gen-{name}/rouge-valid20.json").read_text())
    result[f"{name}_generation"] = {"unknown_pieces": hyps.count("\u2047"), "replacement_chars": hyps.count("\ufffd"),
                                    "rouge1": 100 * rouge["rouge1"]["fmeasure"],
                                    "rouge2": 100 * rouge["rouge2"]["fmeasure"],
                                    "rougeL": 100 * rouge["rougeL"]["fmeasure"]}
Path("results.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
PY
