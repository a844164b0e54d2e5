"""Pretraining objectives on token ids: what the source hides and what the target holds.

Three objectives for unlabeled long documents (``data.task``), each a pure function of the document
and a seeded ``Generator``:

    denoising        BART: permute sentences, infill spans   source ≈ document      target = document[:T]
    gap_sentences    PEGASUS gap-sentence generation         source = doc, gaps→<m> target = gap sentences
    span_corruption  T5 span corruption                      source = doc, spans→Sk target = S0 span0 S1 …

Only the last two fit long documents: their source is the whole document (up to the encoder's
positions) and their target is the part of it that was hidden, cut to the decoder's ``T`` positions;
BART's target is the document itself, so a 4,096-token document teaches only its first ``T`` tokens.

Text infilling (Lewis et al. 2020, §2.2): span lengths are drawn from Poisson(λ) until they cover
``mask_ratio`` of the tokens; each span is replaced by ONE mask token (a length-0 span inserts one).
Spans are laid out without overlap, so exactly ``round(mask_ratio × n)`` original tokens are hidden::

    tokens   a b c d e f g h i j          (n = 10, mask_ratio 0.3 -> 3 tokens hidden)
    spans    lengths [2, 0, 1]  placed before kept tokens 1, 3, 5
    output   a <m> d e <m> f <m> h i j   (b c -> <m>;  an inserted <m>;  g -> <m>)

Everything is numpy and takes an explicit ``Generator``, so a caller seeds it per (seed, epoch, index).
"""

from __future__ import annotations

import math

import numpy as np

SENTENCE_END_CHARS = (".", "!", "?")


def sentence_end_table(proc) -> np.ndarray:
    """Bool per vocabulary id: does this piece end a sentence (``.``, ``!``, ``?``, alone or at its end)."""
    table = np.zeros(proc.GetPieceSize(), dtype=bool)
    for i in range(proc.GetPieceSize()):
        piece = proc.IdToPiece(i).replace("\u2581", "")
        if piece and not proc.IsControl(i) and piece.endswith(SENTENCE_END_CHARS):
            table[i] = True
    return table


def sentence_bounds(tokens: np.ndarray, sentence_end: np.ndarray) -> np.ndarray:
    """Start offsets of the sentences of ``tokens`` and, last, ``len(tokens)``: sentence s is
    ``tokens[bounds[s]:bounds[s + 1]]``. A sentence ends after a piece ``sentence_end`` marks."""
    ends = np.flatnonzero(sentence_end[tokens]) + 1
    return np.concatenate(([0], ends[ends < len(tokens)], [len(tokens)]))


def permute_sentences(
    tokens: np.ndarray, sentence_end: np.ndarray, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Shuffle ``ceil(ratio × sentences)`` of the sentences among their own places (BART's scheme)."""
    if ratio <= 0 or len(tokens) == 0:
        return tokens
    bounds = sentence_bounds(tokens, sentence_end)
    num_sentences = len(bounds) - 1
    num_to_permute = math.ceil(num_sentences * ratio)
    if num_sentences < 2 or num_to_permute < 2:
        return tokens
    order = np.arange(num_sentences)
    chosen = rng.permutation(num_sentences)[:num_to_permute]
    order[chosen] = chosen[rng.permutation(num_to_permute)]
    return np.concatenate([tokens[bounds[s] : bounds[s + 1]] for s in order])


def span_lengths(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(λ) lengths whose sum is exactly ``num_to_mask`` (the last one is cut to fit)."""
    lengths = np.zeros(0, dtype=np.int64)
    while lengths.sum() < num_to_mask:
        draw = rng.poisson(poisson_lambda, size=max(8, int(num_to_mask / poisson_lambda * 1.2) + 8))
        lengths = np.concatenate((lengths, draw))
    total = np.cumsum(lengths)
    last = int(np.searchsorted(total, num_to_mask))  # first index where the sum reaches it
    lengths = lengths[: last + 1].copy()
    lengths[-1] -= int(total[last]) - num_to_mask
    return lengths


def text_infill(
    tokens: np.ndarray, mask_id: int, mask_ratio: float, poisson_lambda: float, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """-> (noised tokens, number of original tokens hidden under mask tokens)."""
    n = len(tokens)
    num_to_mask = int(round(n * mask_ratio))
    if num_to_mask == 0:
        return tokens, 0
    lengths = span_lengths(num_to_mask, poisson_lambda, rng)
    kept_count = n - num_to_mask
    num_spans = len(lengths)
    # each span goes before a distinct kept token (or at the end); slots shared only if there are too few
    gaps = np.sort(rng.choice(kept_count + 1, size=num_spans, replace=num_spans > kept_count + 1))
    starts = gaps + np.concatenate(([0], np.cumsum(lengths)[:-1]))  # in original positions
    hidden = np.zeros(n, dtype=bool)
    span_index = np.repeat(np.arange(num_spans), lengths)
    hidden[starts[span_index] + (np.arange(num_to_mask) - np.repeat(np.cumsum(lengths) - lengths, lengths))] = True
    kept = tokens[~hidden]
    return np.insert(kept, gaps, mask_id), num_to_mask


def add_noise(
    tokens: np.ndarray,
    *,
    mask_id: int,
    sentence_end: np.ndarray,
    mask_ratio: float,
    poisson_lambda: float,
    permute_ratio: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Sentence permutation, then text infilling, on a document without its trailing ``</s>``."""
    tokens = permute_sentences(tokens, sentence_end, permute_ratio, rng)
    noised, _ = text_infill(tokens, mask_id, mask_ratio, poisson_lambda, rng)
    return noised


# --------------------------------------------------------------------------------------------------
# PEGASUS gap sentences
# --------------------------------------------------------------------------------------------------


def sentence_importance(tokens: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """ROUGE-1 F1 of each sentence against the rest of the document, on piece ids (PEGASUS "Ind").

    Unigram counts: with ``c_s`` the sentence's and ``c`` the document's, the rest has ``c - c_s``, the
    overlap is ``Σ min(c_s, c - c_s)``, precision divides it by the sentence length and recall by the
    rest's length."""
    num_sentences, n = len(bounds) - 1, len(tokens)
    total = np.bincount(tokens)
    scores = np.zeros(num_sentences)
    for s in range(num_sentences):
        ids, counts = np.unique(tokens[bounds[s] : bounds[s + 1]], return_counts=True)
        length, rest_length = int(counts.sum()), n - int(counts.sum())
        overlap = np.minimum(counts, total[ids] - counts).sum()
        if overlap == 0 or rest_length == 0:
            continue
        precision, recall = overlap / length, overlap / rest_length
        scores[s] = 2 * precision * recall / (precision + recall)
    return scores


def gap_sentences(
    tokens: np.ndarray,
    *,
    sentence_end: np.ndarray,
    mask_id: int,
    ratio: float,
    score_noise: float,
    max_target_tokens: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (source, target, indices of the gap sentences) for a document without its ``</s>``.

    The ``ceil(ratio × sentences)`` most important sentences (importance × (1 + U(-noise, noise))) are
    chosen, best first, skipping any that would overflow ``max_target_tokens``; each is replaced by one
    ``mask_id`` in the source, and the target is their concatenation in document order::

        tokens   A B C D E          (sentences; C and A score highest, ratio 0.4)
        source   <m> B <m> D E
        target   A C
    """
    bounds = sentence_bounds(tokens, sentence_end)
    num_sentences = len(bounds) - 1
    if num_sentences == 0:
        return tokens, tokens[:0], np.zeros(0, dtype=np.int64)
    scores = sentence_importance(tokens, bounds)
    if score_noise > 0:
        scores = scores * (1.0 + rng.uniform(-score_noise, score_noise, size=num_sentences))
    wanted = max(1, math.ceil(ratio * num_sentences))
    lengths = np.diff(bounds)
    chosen, budget = [], max_target_tokens
    for s in np.argsort(-scores, kind="stable"):
        if len(chosen) == wanted:
            break
        if lengths[s] <= budget:
            chosen.append(int(s))
            budget -= int(lengths[s])
    chosen = np.sort(np.array(chosen, dtype=np.int64))
    is_gap = np.zeros(num_sentences, dtype=bool)
    is_gap[chosen] = True
    pieces = [
        np.array([mask_id], dtype=tokens.dtype) if is_gap[s] else tokens[bounds[s] : bounds[s + 1]]
        for s in range(num_sentences)
    ]
    target = [tokens[bounds[s] : bounds[s + 1]] for s in chosen]
    return (np.concatenate(pieces), np.concatenate(target) if target else tokens[:0], chosen)


# --------------------------------------------------------------------------------------------------
# T5 span corruption
# --------------------------------------------------------------------------------------------------

#: sentinel pieces of span corruption, in order: <extra_id_0>, <extra_id_1>, ... (T5's names)
SENTINEL_FORMAT = "<extra_id_{}>"


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of ``num_segments`` non-empty segments, in random order, summing to ``num_items``."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate(([0], cuts, [num_items])))


def span_counts(
    length: int, noise_density: float, mean_span: float, max_spans: int, max_target_tokens: int
) -> tuple[int, int]:
    """(hidden tokens, spans) for a document of ``length``: T5's ``round(density × length)`` hidden in
    ``round(hidden / mean_span)`` spans, as far as sentinels and the target (each span's sentinel + its
    tokens) allow; every span and every gap between spans keeps at least one token."""
    if length < 2:
        return 0, 0
    hidden = min(max(int(round(length * noise_density)), 1), length - 1)  # as T5: 1 <= hidden < length
    spans = min(max(1, int(round(hidden / mean_span))), max_spans)
    hidden = min(hidden, int(round(spans * mean_span)))  # fewer spans -> fewer hidden tokens
    if hidden + spans > max_target_tokens:  # sentinel + span per span must fit
        hidden = int(max_target_tokens * mean_span / (mean_span + 1))
        spans = max(1, min(spans, int(round(hidden / mean_span))))
        hidden = min(hidden, max_target_tokens - spans)
    spans = min(spans, hidden, length - hidden)  # non-empty spans and gaps
    return (hidden, spans) if spans > 0 else (0, 0)


def span_corruption(
    tokens: np.ndarray,
    *,
    sentinel_ids: np.ndarray,
    noise_density: float,
    mean_span: float,
    max_target_tokens: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (source, target) for a document without its ``</s>`` (T5, Raffel et al. 2020, §3.1.4).

    Hidden spans and the kept gaps between them are random segmentations (T5's
    ``random_spans_noise_mask``); the document starts with kept tokens. Span k becomes sentinel k in the
    source, and the target lists ``sentinel k, span k`` for every span::

        tokens   a b c d e f g h        (spans "b c" and "f")
        source   a S0 d e S1 g h
        target   S0 b c S1 f
    """
    hidden, spans = span_counts(len(tokens), noise_density, mean_span, len(sentinel_ids), max_target_tokens)
    if spans == 0:
        return tokens, tokens[:0]
    span_lengths = _random_segmentation(hidden, spans, rng)
    gap_lengths = _random_segmentation(len(tokens) - hidden, spans, rng)
    starts = np.cumsum(gap_lengths) + np.concatenate(([0], np.cumsum(span_lengths)[:-1]))
    source, target, position = [], [], 0
    for k, (start, span) in enumerate(zip(starts, span_lengths, strict=True)):
        sentinel = sentinel_ids[k : k + 1].astype(tokens.dtype)
        source += [tokens[position:start], sentinel]
        target += [sentinel, tokens[start : start + span]]
        position = start + span
    source.append(tokens[position:])
    return np.concatenate(source), np.concatenate(target)
