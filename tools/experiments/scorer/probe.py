"""Why the last pooling layer's scores saturate on SumPubMed: plain-torch training of a shipped config's model on
a data-bin, logging per pooling layer what the scorer outputs and what gradient reaches it.

    python tools/experiments/scorer/probe.py DATA_BIN --updates 150 --log-every 10 --out probe.jsonl \
        [--config sumpubmed_finetune] [--set model.scorer_centre=false ...]

Per pooling layer and logged update (the mean over the update's documents): mean score, share of scores
below 1e-3, the logits' mean and spread, the scorer weight's gradient norm, dL/dscore (the gradient the
top-k's mixing weights send back, before the sigmoid's derivative: its mean sign says whether the loss
pushes the scores down) and dL/dlogit (after the sigmoid). One process, AdamW and the config's warmup.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from pyramidion_ds.config import load_config  # noqa: E402
from pyramidion_ds.data import SummarizationDataset, collate, vocab_size  # noqa: E402
from pyramidion_ds.engine import label_smoothed_nll_loss  # noqa: E402
from pyramidion_ds.model import PyramidionModel  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--config", default="sumpubmed_finetune")
    parser.add_argument("--set", nargs="*", default=[], help="dotted overrides key=value")
    parser.add_argument("--updates", type=int, default=150)
    parser.add_argument("--docs-per-update", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=0.0, help="stop training after this long (0: no limit)")
    parser.add_argument("--valid-docs", type=int, default=100, help="then: valid nll and selection figure on these")
    args = parser.parse_args()
    overrides = [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.set]
    cfg = load_config(args.config, overrides + [f"--data.data={args.data}"])
    cfg.model.vocab_size = vocab_size(args.data)
    torch.manual_seed(args.seed)
    model = PyramidionModel(cfg.model)
    m = cfg.model
    data = SummarizationDataset(args.data, "train", m.max_source_positions, m.max_target_positions)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = cfg.train.warmup_updates
    logits_seen = {}

    def keep_logits(layer):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.retain_grad()
                logits_seen[layer] = output

        return hook

    for layer in model.encoder.pooling_layers:
        # a plain Linear over the same parameters: the encoder then asks it for the logits (and pools with its
        # torch operators), which the hook keeps; the model's own Scorer computes them inside score_and_pool
        scorer = model.encoder.scorers[layer]
        linear = torch.nn.Linear(scorer.in_features, 1)
        linear.weight, linear.bias = scorer.weight, scorer.bias
        model.encoder.scorers[layer] = linear
        linear.register_forward_hook(keep_logits(layer))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    out = open(args.out, "w")
    started = time.time()
    update = 0
    for update in range(1, args.updates + 1):
        if args.minutes and time.time() - started > 60 * args.minutes:
            break
        for g in optim.param_groups:
            g["lr"] = cfg.train.lr * min(1.0, update / warmup) if warmup else cfg.train.lr
        optim.zero_grad()
        stats, loss_total, tokens = {}, 0.0, 0
        for d in range(args.docs_per_update):
            index = order[((update - 1) * args.docs_per_update + d) % len(order)]
            batch = collate([data[index]], pad_to_multiple=cfg.source_pad_multiple)
            logits = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
            loss, nll = label_smoothed_nll_loss(logits, batch["target"], cfg.train.label_smoothing, m.pad_id)
            ntok = int(batch["ntokens"])
            (loss / ntok / args.docs_per_update).backward()
            loss_total, tokens = loss_total + float(nll.detach()), tokens + ntok
            if update % args.log_every == 0 or update == 1:
                for layer, lg in logits_seen.items():
                    grad = lg.grad.squeeze(-1).float() if lg.grad is not None else torch.zeros(lg.shape[:-1])
                    lg = lg.detach().squeeze(-1).float()
                    s = torch.sigmoid(lg)
                    dlds = grad / (s * (1 - s)).clamp_min(1e-30)
                    row = stats.setdefault(layer, {})
                    for key, value in (
                        ("score_mean", float((s + 1e-5).mean())),
                        ("score_below_1e-3", float((s < 1e-3).float().mean())),
                        ("logit_mean", float(lg.mean())),
                        ("logit_std", float(lg.std())),
                        ("dL_dscore_mean", float(dlds.mean())),
                        ("dL_dscore_abs", float(dlds.abs().mean())),
                        ("dL_dlogit_abs", float(grad.abs().mean())),
                    ):
                        row[key] = row.get(key, 0.0) + value / args.docs_per_update
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_norm or 1e9)
        if stats:
            for layer, row in stats.items():
                w = model.encoder.scorers[layer].weight
                row["scorer_grad_norm"] = float(w.grad.norm()) if w.grad is not None else 0.0
                row["scorer_weight_norm"] = float(w.norm())
                row["scorer_bias"] = float(model.encoder.scorers[layer].bias)
            record = {
                "update": update,
                "nll": loss_total / max(tokens, 1),
                "elapsed_s": time.time() - started,
                "layers": {f"layer{k}": v for k, v in sorted(stats.items())},
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            last = max(stats)
            print(
                f"update {update} nll {record['nll']:.3f} layer{last} score {stats[last]['score_mean']:.2e} "
                f"dL/ds {stats[last]['dL_dscore_mean']:+.2e} grad {stats[last]['scorer_grad_norm']:.2e}",
                flush=True,
            )
        optim.step()
    evaluate(model, cfg, args, update - 1 if args.minutes and update < args.updates else update, out)


@torch.no_grad()
def evaluate(model, cfg, args, updates: int, out) -> None:
    """Valid nll (nats per target piece) and the selection figure (data/selection.py) on the first valid docs."""
    from pyramidion_ds.data.selection import batch_documents, corpus_rows, layer_names, summarize
    from pyramidion_ds.data.spm import load_spm

    m = cfg.model
    model.eval()
    spm = load_spm(args.data)
    pieces = [spm.IdToPiece(i) for i in range(spm.GetPieceSize())]
    valid = SummarizationDataset(args.data, "valid", m.max_source_positions, m.max_target_positions)
    nll_sum = tokens = 0
    docs, after, encoded = [], [], []
    model.encoder.register_forward_hook(lambda mod, inp, o: encoded.append(o))
    for index in range(min(args.valid_docs, len(valid))):
        batch = collate([valid[index]], pad_to_multiple=cfg.source_pad_multiple)
        encoded.clear()
        logits = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
        _, nll = label_smoothed_nll_loss(logits, batch["target"], 0.0, m.pad_id)
        nll_sum, tokens = nll_sum + float(nll), tokens + int(batch["ntokens"])
        pooling = encoded[0].pooling
        after = [info.after_layer for info in pooling] or after
        docs += batch_documents(
            pooling, batch["src_tokens"], batch["src_lengths"], batch["target"], {m.pad_id, m.eos_id, m.bos_id}
        )
    record = {"updates": updates, "valid_docs": len(docs), "valid_nll": nll_sum / max(tokens, 1)}
    if after:
        to_pieces = lambda ids: [pieces[t] for t in ids]  # noqa: E731
        rows = corpus_rows(
            [to_pieces(s) for s, _, _ in docs], [k for _, k, _ in docs], [to_pieces(r) for _, _, r in docs]
        )
        record["selection"] = summarize(rows, layer_names(after))
        record["kept_composition"] = composition([to_pieces(s) for s, _, _ in docs], [k[-1] for _, k, _ in docs])
    out.write(json.dumps(record) + "\n")
    out.flush()
    print(json.dumps(record), flush=True)


def composition(sources, kept) -> dict:
    """Of the final kept pieces and of all pieces: the shares that belong to a content word, to another
    word (a stopword, a 1-letter word, a placeholder) and that have no letter or digit (punctuation, ▁)."""
    import re

    import numpy as np

    from pyramidion_ds.data.selection import is_content_word, piece_words

    alnum = re.compile(r"[^\W_]")
    table = {"kept": np.zeros(3), "all": np.zeros(3)}
    for src, positions in zip(sources, kept, strict=True):
        words = piece_words(src)
        kinds = [
            0 if alnum.search(p) and is_content_word(w) else 1 if alnum.search(p) else 2
            for p, w in zip(src, words, strict=True)
        ]
        kinds = np.array(kinds)
        table["all"] += np.bincount(kinds, minlength=3) / len(kinds)
        chosen = kinds[np.unique([q for q in positions if q < len(src)])]
        table["kept"] += np.bincount(chosen, minlength=3) / max(len(chosen), 1)
    return {
        k: dict(zip(("content", "other_word", "no_letter"), (v / len(sources)).round(4).tolist(), strict=True))
        for k, v in table.items()
    }


if __name__ == "__main__":
    main()
