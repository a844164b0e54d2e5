#!/usr/bin/env python3
"""Probe *why* a variant does or does not learn the synthetic task: a plain-torch loop (one process,
no DeepSpeed) on a `run.py --task synthetic` corpus, printing teacher-forced validation NLL, token
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

    python tools/experiments/pooling_learns/probe_copy.py --learn-dir results/learn/repro-seed1-a \\
        --minutes 6 --selection oracle --set model.pooling_schedule=[2560,128,128]
    python tools/experiments/pooling_learns/probe_copy.py --learn-dir results/learn/repro-seed1-a \\
        --words 200 300 --salient 1 1 --set model.variant=blockwise --batch-docs 4     # short documents, one sentence

``--stage MIN MAX UPDATES`` (repeatable) first trains on in-memory documents of MIN..MAX words, stage after
stage, then on the corpus: the warm-up of ``run.py``. Each stage and the corpus start with a
fresh AdamW and lr warmup, as there (``--keep-optimizer``: one AdamW throughout). ``--eval-words MIN MAX``
(repeatable) adds validation sets of other lengths; ``--eval-placement front|back`` puts all their planted
sentences in the first or last ~250 words, so a drop with length can be told apart from one with position.
``--init-from RUN_DIR`` starts from a run's weights (and its config)::

    # the shipped warm-up, from scratch, one line per stage
    python tools/experiments/pooling_learns/probe_copy.py --learn-dir results/learn/staged-a \\
        --batch-docs 4 --max-update 4300 --minutes 60 --eval-every 100000 --stage 60 100 1500 \\
        --stage 200 300 1000 --stage 400 600 300 --stage 700 1000 300 --stage 1100 1500 300 \\
        --stage 1600 2000 300 --eval-words 200 300 --eval-words 700 800
    # how a warm-up checkpoint copes with longer documents and later planted sentences (no training)
    python tools/experiments/pooling_learns/probe_copy.py --learn-dir results/learn/staged-a \\
        --init-from RUN_DIR --max-update 0 --eval-words 200 300 --eval-words 700 800 \\
        --eval-words 1500 1700 --eval-placement back

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

from pyramidion_ds.config import load_config
from pyramidion_ds.data import collate
from pyramidion_ds.data.spm import load_spm
from pyramidion_ds.data.synthetic import make_example
from pyramidion_ds.engine import label_smoothed_nll_loss, param_groups
from pyramidion_ds.model import PyramidionModel

from run import TASKS, config_path
from selection import measure_selection, piece_offsets, salient_token_mask

SYNTHETIC_CONFIG = config_path(TASKS["synthetic"])


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
        source = ids[: cfg.max_source_positions - 1] + [cfg.eos_id]
        salient = salient_token_mask(begins, ends, record["salient_spans"])[: len(source) - 1]
        target = spm.EncodeAsIds(record["summary"])[: cfg.max_target_positions - 1] + [cfg.eos_id]
        out.append(
            {
                "id": len(out),
                "source": torch.tensor(source),
                "target": torch.tensor(target),
                "salient": torch.tensor(list(salient) + [False]),
            }
        )
    return out


def batch_of(examples, cfg, pad, device="cpu"):
    batch = collate(examples, pad_id=cfg.pad_id, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_to_multiple=pad)
    salient = torch.zeros_like(batch["src_tokens"], dtype=torch.bool)
    for row, example in enumerate(examples):
        salient[row, : len(example["salient"])] = example["salient"]
    batch["salient"] = salient
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def placed_example(index: int, seed: int, min_words: int, max_words: int, num_salient: tuple, placement: str) -> dict:
    """A synthetic record of min..max filler words; ``placement`` front/back moves all its planted sentences
    (those of a 200-250-word example) to the start / end of the document."""
    if placement == "random":
        return make_example(
            index, seed=seed, min_words=min_words, max_words=max_words, split="eval", num_salient=num_salient
        ).to_json()
    planted = make_example(
        index, seed=seed, min_words=200, max_words=250, split="eval-planted", num_salient=num_salient
    )
    filler = make_example(
        index, seed=seed, min_words=min_words, max_words=max_words, split="eval-filler", num_salient=(1, 1)
    )
    start, end = filler.salient_spans[0]
    filler_text = (filler.document[:start] + filler.document[end + 1 :]).strip()  # its own planted one dropped
    if placement == "front":
        return {
            "document": planted.document + " " + filler_text,
            "summary": planted.summary,
            "salient_spans": [list(span) for span in planted.salient_spans],
        }
    shift = len(filler_text) + 1
    return {
        "document": filler_text + " " + planted.document,
        "summary": planted.summary,
        "salient_spans": [[s + shift, e + shift] for s, e in planted.salient_spans],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learn-dir", required=True, help="a `run.py --task synthetic` output dir")
    p.add_argument(
        "--config", default=str(SYNTHETIC_CONFIG), help="run config (default: the experiment's, configs/synthetic.yaml)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument(
        "--selection",
        choices=("learned", "learned-ln", "oracle"),
        default="learned",
        help="learned: the configured scorers; learned-ln: = --set model.scorer_input=layer_norm; "
        "oracle: the first pooling step keeps the planted pieces",
    )
    p.add_argument("--words", type=int, nargs=2, default=None, help="make an in-memory corpus: min max words")
    p.add_argument("--salient", type=int, nargs=2, default=(2, 4), help="with --words: planted sentences")
    p.add_argument("--train-docs", type=int, default=1000, help="with --words: training documents")
    p.add_argument(
        "--stage",
        type=int,
        nargs=3,
        action="append",
        default=[],
        metavar=("MIN", "MAX", "UPDATES"),
        help="before the corpus, UPDATES updates on in-memory documents of MIN..MAX words (repeatable)",
    )
    p.add_argument("--stage-docs", type=int, default=4000, help="documents per stage at most (cycled)")
    p.add_argument(
        "--keep-optimizer",
        action="store_true",
        help="one AdamW across the stages and the corpus (default: a fresh one each, as run.py's train.init_from)",
    )
    p.add_argument(
        "--init-from", default=None, help="start from this run dir's weights; its config.yaml replaces --config"
    )
    p.add_argument(
        "--eval-words",
        type=int,
        nargs=2,
        action="append",
        default=[],
        metavar=("MIN", "MAX"),
        help="also validate on 16 in-memory documents of MIN..MAX words (repeatable)",
    )
    p.add_argument(
        "--eval-placement",
        choices=("random", "front", "back"),
        default="random",
        help="--eval-words documents: planted sentences where the generator puts them, or all in the "
        "first / last ~250 words",
    )
    p.add_argument("--batch-docs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: the config's train.lr")
    p.add_argument(
        "--scorer-lr-scale",
        type=float,
        default=None,
        help="= --set train.scorer_lr_scale=X (scorers' lr = lr x this); default: the config's",
    )
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--max-update", type=int, default=10**9)
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
    config = str(Path(a.init_from) / "config.yaml") if a.init_from else a.config
    cfg = load_config(config, overrides + ["--model.vocab_size", str(spm.GetPieceSize())])
    m = cfg.model
    if a.words:
        kw = dict(seed=a.seed, min_words=a.words[0], max_words=a.words[1], num_salient=tuple(a.salient))
        train = [make_example(i, split="train", **kw).to_json() for i in range(a.train_docs)]
        valid = [make_example(i, split="valid", **kw).to_json() for i in range(16)]
    else:

        def read(split):
            with (learn / "corpus" / f"{split}.jsonl").open(encoding="utf-8") as fh:
                return [json.loads(line) for line in fh]

        train, valid = read("train"), read("valid")[:16]
    train_t = encode_records(train, spm, m)
    valid_sets = {"valid": (valid, encode_records(valid, spm, m))}
    for lo, hi in a.eval_words:
        records = [placed_example(i, a.seed, lo, hi, tuple(a.salient), a.eval_placement) for i in range(16)]
        valid_sets[f"{lo}-{hi}"] = (records, encode_records(records, spm, m))
    phases = []  # (examples, updates): the stages, then the corpus
    for lo, hi, updates in a.stage:
        kw = dict(seed=a.seed, min_words=lo, max_words=hi, num_salient=tuple(a.salient))
        phases.append(
            (
                encode_records(
                    [
                        make_example(i, split=f"stage-{lo}-{hi}", **kw).to_json()
                        for i in range(min(a.stage_docs, updates * a.batch_docs))
                    ],
                    spm,
                    m,
                ),
                updates,
            )
        )
    phases.append((train_t, None))
    model = PyramidionModel(m)
    if a.init_from:
        from pyramidion_ds.checkpoint.weights import init_source

        model.load_state_dict(init_source(a.init_from).state_dict())
    oracles = []
    if a.selection == "oracle":
        oracles = [OracleScorer(linear) for linear in model.encoder.scorers]
        model.encoder.scorers = torch.nn.ModuleList(oracles)
    model.to(a.device)
    t = cfg.train
    lr = a.lr or t.lr

    def new_optimizer():
        opt = torch.optim.AdamW(
            param_groups(model, t.weight_decay, lr, t.scorer_lr_scale), lr=lr, betas=tuple(t.adam_betas), eps=t.adam_eps
        )
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda update: min(1.0, (update + 1) / a.warmup))

    opt, warmup = new_optimizer()
    pad = cfg.source_pad_multiple
    print(
        json.dumps(
            {
                "variant": m.variant,
                "widths": m.encoder_widths(),
                "d_model": m.d_model,
                "selection": a.selection,
                "scorer_input": m.scorer_input,
                "scorer_lr_scale": t.scorer_lr_scale,
                "train_docs": len(train_t),
                "lr": lr,
            }
        ),
        flush=True,
    )

    def set_salient(batch):
        for oracle in oracles:
            oracle.salient = batch["salient"]

    def evaluate(update, seconds, train_nll):
        model.eval()
        line = {"update": update, "seconds": round(seconds, 1), "train_nll": round(train_nll, 3)}
        for name, (records, examples) in valid_sets.items():
            tokens = nll_sum = correct = 0
            with torch.no_grad():
                for start in range(0, len(examples), 4):
                    batch = batch_of(examples[start : start + 4], m, pad, a.device)
                    set_salient(batch)
                    logits = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
                    _, nll = label_smoothed_nll_loss(logits, batch["target"], 0.0, m.pad_id)
                    keep = batch["target"].ne(m.pad_id)
                    correct += int((logits.argmax(-1).eq(batch["target"]) & keep).sum())
                    tokens, nll_sum = tokens + int(keep.sum()), nll_sum + float(nll)
                recall = None
                if m.variant in ("transpooler", "pyramidion") and not oracles:
                    recall = measure_selection(model, spm, records, pad)["recall"]
            prefix = "" if name == "valid" else f"{name}_"
            line.update(
                {
                    f"{prefix}valid_nll": round(nll_sum / tokens, 3),
                    f"{prefix}valid_token_acc": round(correct / tokens, 3),
                    f"{prefix}selection_recall": recall,
                }
            )
        model.train()
        print(json.dumps(line), flush=True)

    update, started, train_nll = 0, time.perf_counter(), float("nan")
    for number, (examples, updates) in enumerate(phases):
        if number and not a.keep_optimizer:
            opt, warmup = new_optimizer()
        end = a.max_update if updates is None else update + updates
        order = []
        while time.perf_counter() - started < a.minutes * 60 and update < min(end, a.max_update):
            if not order:
                order = list(range(len(examples)))
                random.Random(a.seed + update).shuffle(order)
            batch = batch_of([examples[order.pop()] for _ in range(min(a.batch_docs, len(order)))], m, pad, a.device)
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
        if updates is not None and update == end and update % a.eval_every:
            evaluate(update, time.perf_counter() - started, train_nll)  # the end of each stage
    evaluate(update, time.perf_counter() - started, train_nll)
    with torch.no_grad():
        model.eval()
        batch = batch_of(valid_sets["valid"][1][:2], m, pad, a.device)
        set_salient(batch)
        out = model.encode(batch["src_tokens"], batch["src_lengths"])
        for info in out.pooling:
            s = info.input_scores[0][info.input_scores[0] > 1e-5 + 1e-9] if not oracles else info.input_scores[0]
            print(
                json.dumps(
                    {
                        "scores_after_layer": info.after_layer,
                        "min": round(float(s.min()), 5),
                        "mean": round(float(s.mean()), 5),
                        "max": round(float(s.max()), 5),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
