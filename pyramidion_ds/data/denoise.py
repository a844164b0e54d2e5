"""BART's pretraining noise on token ids: sentence permutation, then text infilling.

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


def permute_sentences(tokens: np.ndarray, sentence_end: np.ndarray, ratio: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Shuffle ``ceil(ratio × sentences)`` of the sentences among their own places (BART's scheme)."""
    if ratio <= 0 or len(tokens) == 0:
        return tokens
    ends = np.flatnonzero(sentence_end[tokens]) + 1
    bounds = np.concatenate(([0], ends[ends < len(tokens)], [len(tokens)]))
    num_sentences = len(bounds) - 1
    num_to_permute = math.ceil(num_sentences * ratio)
    if num_sentences < 2 or num_to_permute < 2:
        return tokens
    order = np.arange(num_sentences)
    chosen = rng.permutation(num_sentences)[:num_to_permute]
    order[chosen] = chosen[rng.permutation(num_to_permute)]
    return np.concatenate([tokens[bounds[s]:bounds[s + 1]] for s in order])


def span_lengths(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(λ) lengths whose sum is exactly ``num_to_mask`` (the last one is cut to fit)."""
    lengths = np.zeros(0, dtype=np.int64)
    while lengths.sum() < num_to_mask:
        draw = rng.poisson(poisson_lambda, size=max(8, int(num_to_mask / poisson_lambda * 1.2) + 8))
        lengths = np.concatenate((lengths, draw))
    total = np.cumsum(lengths)
    last = int(np.searchsorted(total, num_to_mask))           # first index where the sum reaches it
    lengths = lengths[:last + 1].copy()
    lengths[-1] -= int(total[last]) - num_to_mask
    return lengths


def text_infill(tokens: np.ndarray, mask_id: int, mask_ratio: float, poisson_lambda: float,
                rng: np.random.Generator) -> tuple[np.ndarray, int]:
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
    starts = gaps + np.concatenate(([0], np.cumsum(lengths)[:-1]))   # in original positions
    hidden = np.zeros(n, dtype=bool)
    span_index = np.repeat(np.arange(num_spans), lengths)
    hidden[starts[span_index] + (np.arange(num_to_mask) - np.repeat(np.cumsum(lengths) - lengths, lengths))] = True
    kept = tokens[~hidden]
    return np.insert(kept, gaps, mask_id), num_to_mask


def add_noise(tokens: np.ndarray, *, mask_id: int, sentence_end: np.ndarray, mask_ratio: float,
              poisson_lambda: float, permute_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Sentence permutation, then text infilling, on a document without its trailing ``</s>``."""
    tokens = permute_sentences(tokens, sentence_end, permute_ratio, rng)
    noised, _ = text_infill(tokens, mask_id, mask_ratio, poisson_lambda, rng)
    return noised
