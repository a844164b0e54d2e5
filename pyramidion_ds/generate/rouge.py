"""ROUGE-1/2/L/Lsum with Porter stemming, through Google's ``rouge_score`` (the reference implementation).

ROUGE-Lsum is summary-level LCS over *sentences*, which ``rouge_score`` reads as newline-separated
lines. Our hypotheses are single lines, so before scoring Lsum both texts are split into sentences:
at existing newlines, and after a ``.``, ``!`` or ``?`` followed by whitespace (:func:`split_sentences`).
ROUGE-1/2/L see the texts unchanged. Reported numbers are means over documents of precision, recall and
F1, in [0, 1].
"""

from __future__ import annotations

import re

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line: split at newlines and after sentence-ending punctuation + whitespace."""
    sentences = []
    for line in text.splitlines():
        sentences.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return "\n".join(sentences)


def rouge_scores(hypotheses: list[str], references: list[str]) -> dict:
    """{rouge_type: {"precision", "recall", "fmeasure"}} averaged over pairs, plus "count"."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"rouge: {len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES[:3]), use_stemmer=True)
    lsum_scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    totals = {t: {"precision": 0.0, "recall": 0.0, "fmeasure": 0.0} for t in ROUGE_TYPES}
    for hyp, ref in zip(hypotheses, references, strict=True):
        plain = scorer.score(ref, hyp)
        lsum = lsum_scorer.score(split_sentences(ref), split_sentences(hyp))["rougeLsum"]
        for rouge_type in ROUGE_TYPES:
            score = lsum if rouge_type == "rougeLsum" else plain[rouge_type]
            for key in ("precision", "recall", "fmeasure"):
                totals[rouge_type][key] += getattr(score, key)
    count = max(1, len(hypotheses))
    out = {t: {k: v / count for k, v in parts.items()} for t, parts in totals.items()}
    out["count"] = len(hypotheses)
    return out


def format_rouge(scores: dict) -> str:
    """One line: 'ROUGE-1 45.12 | ROUGE-2 ...' (F1 × 100)."""
    names = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
    return (
        " | ".join(f"{names[t]} {100 * scores[t]['fmeasure']:.2f}" for t in ROUGE_TYPES)
        + f" (F1, {scores['count']} documents, stemmed)"
    )
