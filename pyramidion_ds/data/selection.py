"""Selection figure: does the pyramid keep the source pieces that the document's own reference is about?

Per document and per pooling layer (and the encoder output, the last layer's), with ``kept`` = the source
positions that *dominate* a real slot after that top-k (``PoolingInfo.source_positions``: the member
with the larger mixing weight at every halving round, ``member[..., 0]`` in ``model/topk.py``), counted
once each::

    own      share of kept pieces that belong to a content word of the document's reference
    all      the same share over every source piece the model read (what random selection keeps on average)
    lead     the share over the first |kept| source pieces (a lead baseline of the same width)
    control  the share of the same kept pieces against ANOTHER document's reference (the next one)
    control_all   that other reference's share over every source piece
    lift     (own - all) - (control - control_all): the document-specific lift

A scorer that keeps generic domain words lifts ``control`` as much as ``own``; only ``lift`` > 0 is
selection for this document. The figure is a measurement, never a training objective.

Words and content words. Pieces are grouped into words at sentencepiece's word-start marker ``▁`` (a
user-defined symbol such as ``<dig>`` is its own word). A word is compared lowercased with its leading and
trailing punctuation stripped; it is a *content word* when it has a letter, at least 2 characters, is not
in :data:`STOPWORDS` (a fixed English list, no dependency) and is not a placeholder (``<dig>``, ``<cit>``).
A source piece *belongs to* a content word of a reference when the piece has a letter or digit itself
(a ``.`` after a word does not count) and its word is one of the reference's content words.
"""

from __future__ import annotations

import math
import re
import string
from typing import Iterable, Sequence

import numpy as np

WORD_START = "\u2581"
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each et few for from further had has have
    having he her here hers herself him himself his how however i if in into is it its itself just may me
    might more most must my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these they this
    those through thus to too under until up upon very via was we were what when where which while who whom
    why will with within without would you your yours yourself yourselves al fig figure table i.e e.g""".split()
)
_STRIP = string.punctuation + "\u2581"
_HAS_LETTER = re.compile(r"[^\W\d_]")
_HAS_ALNUM = re.compile(r"[^\W_]")
#: the figures per layer, in the order of :func:`document_rows`
FIGURES = ("own", "all", "lead", "control", "control_all", "lift")


def normalize_word(word: str) -> str:
    """Lowercased, leading and trailing punctuation stripped; a ``<placeholder>`` stays as it is."""
    word = word.strip(WORD_START)
    if len(word) > 2 and word[0] == "<" and word[-1] == ">":
        return word.lower()
    return word.strip(_STRIP).lower()


def is_content_word(word: str) -> bool:
    """``word`` already normalized: a letter, 2+ characters, not a stopword, not a ``<placeholder>``."""
    return len(word) >= 2 and word not in STOPWORDS and bool(_HAS_LETTER.search(word)) and not word.startswith("<")


def piece_words(pieces: Sequence[str]) -> list[str]:
    """The normalized word each piece belongs to (words start at ``▁`` or at a ``<symbol>`` piece)."""
    words, current, members = [], "", []

    def close():
        word = normalize_word(current)
        words.extend([word] * len(members))

    for index, piece in enumerate(pieces):
        starts = piece.startswith(WORD_START) or (piece.startswith("<") and piece.endswith(">") and len(piece) > 2)
        if index and starts:
            close()
            current, members = "", []
        current += piece
        members.append(index)
    if members:
        close()
    return words


def content_words(pieces: Sequence[str]) -> set[str]:
    """The content words of a text given as its pieces (e.g. a reference summary)."""
    return {w for w in piece_words(pieces) if is_content_word(w)}


def piece_hits(pieces: Sequence[str], reference_words: set[str]) -> np.ndarray:
    """n bool: source piece i has a letter or digit and its word is one of ``reference_words``."""
    words = piece_words(pieces)
    return np.fromiter(
        (bool(_HAS_ALNUM.search(p)) and w in reference_words for p, w in zip(pieces, words, strict=True)),
        dtype=bool,
        count=len(pieces),
    )


def _share(hits: np.ndarray, positions: np.ndarray) -> float:
    return float(hits[positions].mean()) if positions.size else math.nan


def document_rows(
    source_pieces: Sequence[str], kept_per_layer: Sequence[Iterable[int]], own: set[str], other: set[str]
) -> list[dict]:
    """Per layer, the figures of :data:`FIGURES` for one document.

    ``kept_per_layer``: the dominant source positions of the real slots after each pooling (positions at
    or beyond ``len(source_pieces)`` are ignored); ``own`` / ``other``: content words of the document's
    reference and of another document's reference.
    """
    hits, control_hits = piece_hits(source_pieces, own), piece_hits(source_pieces, other)
    everything = np.arange(len(source_pieces))
    rows = []
    for kept in kept_per_layer:
        kept = np.unique(np.asarray([p for p in kept if 0 <= p < len(source_pieces)], dtype=np.int64))
        row = {
            "own": _share(hits, kept),
            "all": _share(hits, everything),
            "lead": _share(hits, everything[: kept.size]),
            "control": _share(control_hits, kept),
            "control_all": _share(control_hits, everything),
            "kept": int(kept.size),
        }
        row["lift"] = (row["own"] - row["all"]) - (row["control"] - row["control_all"])
        rows.append(row)
    return rows


def corpus_rows(
    sources: Sequence[Sequence[str]], kept: Sequence[Sequence[Iterable[int]]], references: Sequence[Sequence[str]]
) -> list[list[dict]]:
    """:func:`document_rows` for every document; document i's control is document (i+1)'s reference
    (needs 2+ documents; one document gets no rows)."""
    if len(sources) < 2:
        return []
    words = [content_words(r) for r in references]
    return [document_rows(sources[i], kept[i], words[i], words[(i + 1) % len(sources)]) for i in range(len(sources))]


def summarize(rows: list[list[dict]], layer_names: Sequence[str], samples: int = 2000, seed: int = 0) -> dict:
    """Mean of every figure per layer over documents, and for ``lift`` a 95% bootstrap interval over
    documents (percentile, ``samples`` resamples, fixed ``seed``) beside the mean's standard error."""
    result = {"documents": len(rows), "layers": {}}
    rng = np.random.default_rng(seed)
    for layer, name in enumerate(layer_names):
        table = {f: np.array([doc[layer][f] for doc in rows if len(doc) > layer], dtype=np.float64) for f in FIGURES}
        figures = {f: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for f, v in table.items()}
        lift = table["lift"][np.isfinite(table["lift"])]
        if lift.size >= 2:
            means = lift[rng.integers(0, lift.size, size=(samples, lift.size))].mean(axis=1)
            figures["lift_ci95"] = [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
            figures["lift_stderr"] = float(lift.std(ddof=1) / math.sqrt(lift.size))
        figures["kept_mean"] = float(np.mean([doc[layer]["kept"] for doc in rows if len(doc) > layer]))
        result["layers"][name] = figures
    return result


def layer_names(after_layers: Sequence[int]) -> list[str]:
    """``layer{i}`` per pooling (the encoder layer it follows); the last one is the encoder output."""
    return [f"layer{i}" for i in after_layers]


def batch_documents(pooling, src_tokens, src_lengths, target, skip_ids: set[int]) -> list[tuple]:
    """Per row of an encoded batch: (source ids, kept positions per pooling layer, reference ids).

    ``pooling``: ``EncoderOut.pooling`` (kept = ``source_positions`` of the real slots); ``target``: B×T
    reference ids, of which ``skip_ids`` (pad, eos, bos) are dropped. Plain lists, to gather across ranks.
    """
    docs = []
    for row, length in enumerate(src_lengths.tolist()):
        kept = [info.source_positions[row][info.mask[row]].tolist() for info in pooling]
        reference = [t for t in target[row].tolist() if t not in skip_ids]
        docs.append((src_tokens[row, :length].tolist(), kept, reference))
    return docs


def selection_scalars(documents: Sequence[tuple], pieces: Sequence[str], after_layers: Sequence[int]) -> dict:
    """``{"selection/layer{i}_{figure}": mean over documents}`` for :func:`batch_documents` rows, with
    ``pieces`` the vocabulary's piece per id ({} for fewer than 2 documents or no pooling)."""

    def to_pieces(ids):
        return [pieces[t] if 0 <= t < len(pieces) else "" for t in ids]

    rows = corpus_rows(
        [to_pieces(src) for src, _, _ in documents],
        [kept for _, kept, _ in documents],
        [to_pieces(ref) for _, _, ref in documents],
    )
    if not rows or not after_layers:
        return {}
    summary = summarize(rows, layer_names(after_layers), samples=200)
    return {
        f"selection/{layer}_{figure}": value
        for layer, figures in summary["layers"].items()
        for figure, value in figures.items()
        if figure in FIGURES
    }
