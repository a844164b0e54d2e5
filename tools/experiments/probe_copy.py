#!/usr/bin/env python3
"""Probe *why* a variant does or does not learn the synthetic task: a plain-torch loop (one process,
no DeepSpeed) on a `pyramidion-bench learn` corpus, printing teacher-forced validation NLL, token
accuracy and selection recall as training goes, and the scorers' score ranges at the end.

``--selection oracle`` replaces every scorer of the first pooling step with the answer (logit +10 on
the planted sentences' pieces, -10 elsewhere; later pooling steps see equal scores), so the pooled
encoder output is known to hold every planted piece unmixed. If the model still does not learn to copy
with the oracle, selection is not what limits it: the decoder's copying is. ``--selection learned`` runs
the model's scorers as configured (``model.scorer_input``; the optimizer groups and the scorers' lr,
``train.scorer_lr_scale``, come from ``pyramidion_ds.engine.param_groups``); ``--selection learned-ln``
is short for ``--set model.scorer_input=layer_norm`` and ``--scorer-lr-scale X`` for
``--set train.scorer_lr_scale=X``. The raw scorer of old: ``--set model.scorer_input=hidden
--set train.scorer_lr_scale=1``.

    python tools/experiments/probe_copy.py --learn-dir results/learn/repro-seed1-a --minutes 6 \\
        --selection oracle --set model.pooling_schedule=[2560,128,128]
    python tools/experiments/probe_copy.py --learn-dir results/learn/repro-seed1-a --words 200 300 \\
        --salient 1 1 --set model.variant=blockwise --batch-docs 4     # short documents, one sentence

``--curriculum-words 200 300 --curriculum-updates 5000`` first trains on short in-memory documents (the
warm-up of ``pyramidion-bench learn``), then on the long corpus.

It reads ``LEARN_DIR/data-bin/spm.model`` and ``LEARN_DIR/corpus/{train,valid}.jsonl`` (or, with
``--words``, makes a fresh in-memory synthetic corpus of that length with the same vocabulary).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from pyramidion_ds.bench.learn import measure_selection, piece_offsets, salient_token_mask
from pyramidion_ds.config import load_config
from pyramidion_ds.data import collate
from pyramidion_ds.data.spm import load_spm
from pyramidion_ds.data.synthetic import make_example
from pyramidion_ds.engine import label_smoothed_nll_loss, param_groups
from pyramidion_ds.model import PyramidionModel


class OracleScorer(torch.nn.Module):
    """Scores the planted pieces of the current batch (``self.salient``, B×n) as kept, the rest as dropped;
    at any other width (a later pooling step) every slot scores the same."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear  # kept so the parameter set (and the optimizer) match the learned model
        self.salient = None

    def forward(self, x):
        zero = 0.0 * self.linear(x)
        if self.salient is None or self.salient.size(1) != x.size(1):
            return zero
        return zero + (self.salient.to(x.dtype) * 20.0 - 10.0).unsqueeze(-1)


def encode_records(records, spm, cfg):
    out = []
    for record in records:
        ids, begins, ends = piece_offsets(spm, record["document"])
        source = ids[:cfg.max_source_positions - 1] + [cfg.eos_id]
        salient = salient_token_mask(begins, ends, record["salient_spans"])[:len(source) - 1]
        target = spm.EncodeAsIds(record["summary"])[:cfg.max_target_positions - 1] + [cfg.eos_id]
        out.append({"id": len(out), "source": torch.tensor(source), "target": torch.tensor(target),
                    "salient": torch.tensor(list(salient) + [False])})
    return out


def batch_of(examples, cfg, pad, device="cpu"):
    batch = collate(examples, pad_id=cfg.pad_id, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_to_multiple=pad)
    salient = torch.zeros_like(batch["src_tokens"], dtype=torch.bool)
    for row, example in enumerate(examples):
        salient[row, :len(example["salient"])] = example["salient"]
    batch["salient"] = salient
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learn-dir", required=True, help="a `pyramidion-bench learn --task synthetic` output dir")
    p.add_argument("--config", default="learn_synthetic", help="run config (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--selection", choices=("learned", "learned-ln", "oracle"), default="learned",
                   help="learned: the configured scorers; learned-ln: = --set model.scorer_input=layer_norm; "
                   "oracle: the first pooling step keeps the planted pieces")
    p.add_argument("--words", type=int, nargs=2, default=None, help="make an in-memory corpus: min max words")
    p.add_argument("--salient", type=int, nargs=2, default=(2, 4), help="with --words: planted sentences")
    p.add_argument("--train-docs", type=int, default=1000, help="with --words: training documents")
    p.add_argument("--curriculum-words", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="first train on in-memory documents of MIN..MAX words (--curriculum-updates of them)")
    p.add_argument("--curriculum-updates", type=int, default=0)
    p.add_argument("--curriculum-docs", type=int, default=4000, help="warm-up training documents (cycled)")
    p.add_argument("--curriculum-fresh-optimizer", action="store_true",
                   help="new AdamW + lr warmup after the warm-up, as pyramidion-bench learn's train.init_from does")
    p.add_argument("--batch-docs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: the config's train.lr")
    p.add_argument("--scorer-lr-scale", type=float, default=None,
                   help="= --set train.scorer_lr_scale=X (scorers' lr = lr x this); default: the config's")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--max-update", type=int, default=10 ** 9)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    learn = Path(a.learn_dir)
    spm = load_spm(learn / "data-bin")
    overrides = []
    for item in a.set:
        key, _, value = item.partition("=")
        overrides += [f"--{key}", value]
    if a.selection == "learned-ln":
        overrides += ["--model.scorer_input", "layer_norm"]
    if a.scorer_lr_scale is not None:
        overrides += ["--train.scorer_lr_scale", str(a.scorer_lr_scale)]
    cfg = load_config(a.config, overrides + ["--model.vocab_size", str(spm.GetPieceSize())])
    m = cfg.model
    if a.words:
        kw = dict(seed=a.seed, min_words=a.words[0], max_words=a.words[1], num_salient=tuple(a.salient))
        train = [make_example(i, split="train", **kw).to_json() for i in range(a.train_docs)]
        valid = [make_example(i, split="valid", **kw).to_json() for i in range(16)]
    else:
        read = lambda split: [json.loads(line) for line in (learn / "corpus" / f"{split}.jsonl").open(encoding="utf-8")]
        train, valid = read("train"), read("valid")[:16]
    train_t, valid_t = encode_records(train, spm, m), encode_records(valid, spm, m)
    short_t = []
    if a.curriculum_words and a.curriculum_updates:
        kw = dict(seed=a.seed, min_words=a.curriculum_words[0], max_words=a.curriculum_words[1],
                  num_salient=tuple(a.salient))
        short_t = encode_records([make_example(i, split="curriculum", **kw).to_json()
                                  for i in range(a.curriculum_docs)], spm, m)
    model = PyramidionModel(m)
    oracles = []
    if a.selection == "oracle":
        oracles = [OracleScorer(linear) for linear in model.encoder.scorers]
        model.encoder.scorers = torch.nn.ModuleList(oracles)
    model.to(a.device)
    t = cfg.train
    lr = a.lr or t.lr
    def new_optimizer():
        opt = torch.optim.AdamW(param_groups(model, t.weight_decay, lr, t.scorer_lr_scale), lr=lr,
                                betas=tuple(t.adam_betas), eps=t.adam_eps)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda update: min(1.0, (update + 1) / a.warmup))

    opt, warmup = new_optimizer()
    pad = cfg.data.pad_to_multiple or m.chunk_size
    print(json.dumps({"variant": m.variant, "widths": m.encoder_widths(), "d_model": m.d_model,
                      "selection": a.selection, "scorer_input": m.scorer_input,
                      "scorer_lr_scale": t.scorer_lr_scale, "train_docs": len(train_t), "lr": lr}), flush=True)

    def set_salient(batch):
        for oracle in oracles:
            oracle.salient = batch["salient"]

    def evaluate(update, seconds, train_nll):
        model.eval()
        tokens = nll_sum = correct = 0
        with torch.no_grad():
            for start in range(0, len(valid_t), 4):
                batch = batch_of(valid_t[start:start + 4], m, pad, a.device)
                set_salient(batch)
                logits = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
                _, nll = label_smoothed_nll_loss(logits, batch["target"], 0.0, m.pad_id)
                keep = batch["target"].ne(m.pad_id)
                correct += int((logits.argmax(-1).eq(batch["target"]) & keep).sum())
                tokens, nll_sum = tokens + int(keep.sum()), nll_sum + float(nll)
            recall = None
            if m.variant in ("transpooler", "pyramidion") and not oracles:
                recall = measure_selection(model, spm, valid, pad)["recall"]
        model.train()
        print(json.dumps({"update": update, "seconds": round(seconds, 1), "train_nll": round(train_nll, 3),
                          "valid_nll": round(nll_sum / tokens, 3), "valid_token_acc": round(correct / tokens, 3),
                          "selection_recall": recall}), flush=True)

    update, order, started, train_nll = 0, [], time.perf_counter(), float("nan")
    while time.perf_counter() - started < a.minutes * 60 and update < a.max_update:
        if short_t and update == a.curriculum_updates and a.curriculum_fresh_optimizer:
            opt, warmup = new_optimizer()
        if update < a.curriculum_updates and short_t:
            first = update * a.batch_docs
            batch = batch_of([short_t[(first + i) % len(short_t)] for i in range(a.batch_docs)], m, pad, a.device)
        else:
            if not order:
                order = list(range(len(train_t)))
                random.Random(a.seed + update).shuffle(order)
            batch = batch_of([train_t[order.pop()] for _ in range(min(a.batch_docs, len(order)))], m, pad, a.device)
        set_salient(batch)
        logits = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
        loss, nll = label_smoothed_nll_loss(logits, batch["target"], cfg.train.label_smoothing, m.pad_id)
        opt.zero_grad()
        (loss / batch["ntokens"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_norm or 1.0)
        opt.step()
        warmup.step()
        update += 1
        train_nll = float(nll.detach()) / float(batch["ntokens"])
        if update % a.eval_every == 0:
            evaluate(update, time.perf_counter() - started, train_nll)
    evaluate(update, time.perf_counter() - started, train_nll)
    with torch.no_grad():
        model.eval()
        batch = batch_of(valid_t[:2], m, pad, a.device)
        set_salient(batch)
        out = model.encode(batch["src_tokens"], batch["src_lengths"])
        for info in out.pooling:
            s = info.input_scores[0][info.input_scores[0] > 1e-5 + 1e-9] if not oracles else info.input_scores[0]
            print(json.dumps({"scores_after_layer": info.after_layer, "min": round(float(s.min()), 5),
                              "mean": round(float(s.mean()), 5), "max": round(float(s.max()), 5)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
