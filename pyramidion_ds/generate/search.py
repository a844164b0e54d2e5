"""Batched beam search (and sampling) over the model's ``encode`` / ``decode_step`` API, fairseq rules.

One batch of B sources runs K = ``beam`` hypotheses each; decoder rows are source-major::

    rows  0 .. K-1     source 0, beams 0..K-1        cache.self_kv[layer]   (B·K)×H×t×dh  (reordered per step)
    rows  K .. 2K-1    source 1                      cache.source_kv[layer]  B×H×k×dh    (once per source)
    ...

Per step, for every source: scores of all K·V continuations → the best 2K candidates; an ``</s>``
among the first K is *finalized* (score / length**lenpen, length counting ``</s>``); the first K
candidates that are not ``</s>`` become the next beams. A source is done once it has K finalized
hypotheses (fairseq's stopping rule) or no live beam; done sources are dropped from the batch (their
rows leave the self-attention cache, their row leaves the shared cross-attention K/V). At step
``max_len`` (a·src_len + b, capped by the model's target positions) only ``</s>`` is allowed; before
``min_len`` it is forbidden; ``<pad>`` and ``<s>`` are never generated.

Sampling (``sampling=True``): each of the K rows of a source draws its next token from
softmax(logits / temperature); a row that draws ``</s>`` is finalized and stops.

:func:`exhaustive_search` scores every sequence of a tiny model and is the reference the tests and
``pyramidion-bench generate`` compare beam search against.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..model import StaticDecoderCache
from .cuda_graph import GraphedDecodeStep


@dataclass
class SearchOptions:
    """What one call of :func:`generate` does (built from :class:`GenerationConfig` by the runner)."""

    beam: int = 4
    nbest: int = 1
    lenpen: float = 1.0
    min_len: int = 1
    max_len_a: float = 0.0
    max_len_b: int = 200
    no_repeat_ngram_size: int = 0
    sampling: bool = False
    temperature: float = 1.0
    use_cache: bool = True  #: False decodes the whole prefix every step (the benchmark's baseline)
    static_cache: bool = False  #: preallocated KV cache, one fixed kernel sequence per step (any device)
    cuda_graph: bool = False  #: on CUDA: static cache, each step replayed from a CUDA graph (CPU: ignored)
    generator: Optional[torch.Generator] = field(default=None, repr=False)  #: sampling RNG


@dataclass
class Hypothesis:
    tokens: list[int]  #: generated ids, ending with </s>
    score: float  #: sum of log-probabilities / len(tokens)**lenpen
    positional_scores: list[float]  #: log-probability of each token


def max_lengths(src_lengths: Tensor, opts: SearchOptions, max_target_positions: int) -> Tensor:
    """Per source: the most tokens before ``</s>`` (a·src_len + b, leaving a position for ``</s>``)."""
    wanted = (opts.max_len_a * src_lengths.double() + opts.max_len_b).floor().long()
    return wanted.clamp(min=1, max=max_target_positions - 1)


def _block_ngrams(lprobs: Tensor, tokens: Tensor, n: int) -> None:
    """Forbid every token that would repeat an n-gram already in the row. tokens: R×L (with <s>)."""
    if tokens.size(1) < n:
        return
    windows = tokens.unfold(1, n, 1)  # R×W×n, every n-gram so far
    last = tokens[:, tokens.size(1) - (n - 1) :]  # R×(n-1), the prefix of the next n-gram
    match = (
        (windows[:, :, : n - 1] == last.unsqueeze(1)).all(dim=2)
        if n > 1
        else torch.ones(windows.shape[:2], dtype=torch.bool, device=tokens.device)
    )
    banned = torch.zeros_like(lprobs, dtype=torch.int32)
    banned.scatter_add_(1, windows[:, :, n - 1], match.to(torch.int32))
    lprobs.masked_fill_(banned > 0, -math.inf)


@torch.no_grad()
def generate(
    model, src_tokens: Tensor, src_lengths: Tensor, opts: SearchOptions, encoder_out=None
) -> list[list[Hypothesis]]:
    """The ``nbest`` best hypotheses of every source (best first). src_tokens: B×S right-padded."""
    cfg = model.cfg
    bos, eos, pad = cfg.bos_id, cfg.eos_id, cfg.pad_id
    device = src_tokens.device
    num_sources, K = src_tokens.size(0), opts.beam
    if encoder_out is None:
        encoder_out = model.encode(src_tokens, src_lengths)
    limit = max_lengths(src_lengths.to(device), opts, cfg.max_target_positions)  # B
    steps = int(limit.max()) + 1

    tokens = torch.full((num_sources * K, steps + 1), pad, dtype=torch.long, device=device)
    tokens[:, 0] = cfg.start_id
    positional = torch.zeros(num_sources * K, steps, device=device)
    scores = torch.zeros(num_sources, K, device=device)
    if not opts.sampling:
        scores[:, 1:] = -math.inf  # step 0: all beams are equal, expand beam 0 only
    alive = torch.arange(num_sources, device=device)  # batch row -> original source index
    finalized: list[list[Hypothesis]] = [[] for _ in range(num_sources)]
    decode = model.decode_step
    if not opts.use_cache:
        cache = None
    elif opts.static_cache or (opts.cuda_graph and device.type == "cuda"):
        cache = model.new_static_cache(encoder_out, num_sources * K, steps)
        if opts.cuda_graph and device.type == "cuda":
            decode = GraphedDecodeStep(model)
    else:
        cache = model.new_cache()

    # step 0: every beam of a source holds the same "<s>" (beams 1.. start at -inf), so the decoder runs one
    # row per source and its logits are repeated over the beams (the fixed-shape static cache keeps all rows)
    one_row_first = K > 1 and not isinstance(cache, StaticDecoderCache)
    for step in range(steps):
        B = alive.numel()
        if step == 0 and one_row_first:
            logits = decode(tokens[::K, :1], encoder_out, cache).float().repeat_interleave(K, dim=0)
        else:
            logits = decode(tokens[:, : step + 1], encoder_out, cache).float()
        if opts.temperature != 1.0:
            logits = logits / opts.temperature
        lprobs = torch.log_softmax(logits, dim=-1)
        V = lprobs.size(1)
        lprobs[:, pad] = -math.inf
        lprobs[:, bos] = -math.inf
        if step < opts.min_len:
            lprobs[:, eos] = -math.inf
        at_limit = (limit[alive] <= step).repeat_interleave(K)
        if at_limit.any():
            eos_lp = lprobs[at_limit, eos]
            lprobs[at_limit] = -math.inf
            lprobs[at_limit, eos] = eos_lp
        if opts.no_repeat_ngram_size > 0:
            _block_ngrams(lprobs, tokens[:, : step + 1], opts.no_repeat_ngram_size)

        if opts.sampling:
            cand_scores, cand_beams, cand_tokens = _sample(lprobs, scores, K, opts.generator)
        else:  # a source's best 2K continuations are among the best 2K of each of its rows: no (B·K)×V sum
            row_lprobs, row_tokens = lprobs.topk(min(2 * K, V), dim=1)  # (B·K)×C
            C = row_tokens.size(1)
            flat = (scores.view(B * K, 1) + row_lprobs).view(B, K * C)
            cand_scores, cand_index = flat.topk(min(2 * K, K * C), dim=1)
            cand_beams = cand_index // C
            cand_tokens = row_tokens.view(B, K * C).gather(1, cand_index)
        cand_rows = cand_beams + torch.arange(B, device=device).unsqueeze(1) * K
        cand_lprobs = lprobs[cand_rows, cand_tokens]
        finite = torch.isfinite(cand_scores)
        is_eos = cand_tokens.eq(eos) & finite

        # finalize </s> among the first K candidates (all of them when sampling)
        eos_pos = is_eos[:, :K].nonzero().tolist()
        if eos_pos:
            where = torch.tensor(eos_pos, device=device)
            rows = cand_rows[where[:, 0], where[:, 1]]
            prefix = tokens.index_select(0, rows)[:, 1 : step + 1].tolist()
            pos = positional.index_select(0, rows)[:, :step].tolist()
            final_scores = cand_scores[where[:, 0], where[:, 1]].tolist()
            final_lprobs = cand_lprobs[where[:, 0], where[:, 1]].tolist()
            alive_cpu = alive.tolist()
            for i, (b, _) in enumerate(eos_pos):
                done = finalized[alive_cpu[b]]
                if len(done) < K:
                    done.append(
                        Hypothesis(
                            prefix[i] + [eos], final_scores[i] / (step + 1) ** opts.lenpen, pos[i] + [final_lprobs[i]]
                        )
                    )

        # next beams: the first K candidates that are live and not </s>
        live = finite & ~is_eos
        order_key = torch.arange(cand_scores.size(1), device=device) + (~live).long() * cand_scores.size(1)
        pick = order_key.topk(K, dim=1, largest=False).indices  # B×K
        picked_live = live.gather(1, pick)
        next_scores = cand_scores.gather(1, pick).masked_fill(~picked_live, -math.inf)
        next_rows = cand_rows.gather(1, pick)
        next_tokens = cand_tokens.gather(1, pick)
        next_lprobs = cand_lprobs.gather(1, pick)

        finished = torch.tensor([len(finalized[s]) >= K for s in alive.tolist()], device=device)
        finished |= ~picked_live.any(dim=1)
        if step == steps - 1 or bool(finished.all()):
            break
        keep = (~finished).nonzero().squeeze(1)  # kept batch rows
        rows = next_rows.index_select(0, keep).view(-1)
        tokens = tokens.index_select(0, rows)
        tokens[:, step + 1] = next_tokens.index_select(0, keep).view(-1)
        positional = positional.index_select(0, rows)
        positional[:, step] = next_lprobs.index_select(0, keep).view(-1)
        scores = next_scores.index_select(0, keep)
        if cache is not None:
            cache.reorder(rows // K if step == 0 and one_row_first else rows)  # step 0: one cache row per source
        if keep.numel() < B:
            if cache is not None:
                cache.select_sources(keep)
            encoder_out = encoder_out.select(keep)
            alive = alive.index_select(0, keep)

    return [sorted(hyps, key=lambda h: -h.score)[: opts.nbest] for hyps in finalized]


def _sample(lprobs: Tensor, scores: Tensor, K: int, generator) -> tuple[Tensor, Tensor, Tensor]:
    """One draw per row: (B×K scores, beam index, token). Dead rows (score -inf) stay dead."""
    B = scores.size(0)
    probs = lprobs.exp()
    dead = ~torch.isfinite(scores.view(-1)) | probs.sum(dim=1).le(0)
    probs[dead] = 1.0  # any valid distribution; the candidate's score stays -inf
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    new_scores = scores.view(-1) + lprobs.gather(1, drawn.unsqueeze(1)).squeeze(1)
    new_scores[dead] = -math.inf
    beams = torch.arange(K, device=scores.device).repeat(B, 1)
    return new_scores.view(B, K), beams, drawn.view(B, K)


# ------------------------------------------------------------------------------------------------------
# the reference: every sequence of a tiny model, scored exactly
# ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def exhaustive_search(model, src_tokens: Tensor, src_lengths: Tensor, opts: SearchOptions) -> list[list[Hypothesis]]:
    """All sequences ``t1..tm </s>`` (min_len <= m <= max_len) of every source, scored as beam search
    scores them, best first. Only for tiny vocabularies and lengths (V**max_len sequences)."""
    cfg = model.cfg
    specials = {cfg.bos_id, cfg.pad_id, cfg.eos_id}
    allowed = [t for t in range(cfg.vocab_size) if t not in specials]
    limits = max_lengths(src_lengths, opts, cfg.max_target_positions).tolist()
    results = []
    for b in range(src_tokens.size(0)):
        source = src_tokens[b : b + 1, : int(src_lengths[b])]
        hyps = []
        for length in range(opts.min_len, limits[b] + 1):  # every sequence of one length in one forward
            seqs = [list(body) + [cfg.eos_id] for body in itertools.product(allowed, repeat=length)]
            if opts.no_repeat_ngram_size:
                seqs = [s for s in seqs if not _repeats_ngram([cfg.bos_id] + s, opts.no_repeat_ngram_size)]
            if not seqs:
                continue
            targets = torch.tensor(seqs)
            prefix = torch.cat([torch.full((len(seqs), 1), cfg.start_id), targets[:, :-1]], dim=1)
            logits = model.forward(source.expand(len(seqs), -1), src_lengths[b : b + 1].expand(len(seqs)), prefix)
            lprobs = torch.log_softmax(logits.float() / opts.temperature, dim=-1)
            pos = lprobs.gather(2, targets.unsqueeze(2)).squeeze(2).tolist()
            hyps.extend(Hypothesis(seq, sum(p) / len(seq) ** opts.lenpen, p) for seq, p in zip(seqs, pos, strict=True))
        results.append(sorted(hyps, key=lambda h: -h.score)[: opts.nbest])
    return results


def _repeats_ngram(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))
