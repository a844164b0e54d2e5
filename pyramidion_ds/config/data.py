"""Data section of the config: where the binarized shards are and how batches are made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .core import option


@dataclass
class DenoisingConfig:
    """BART-style pretraining noise, applied on the fly to unlabeled long documents."""

    mask_ratio: float = option(0.3, "share of source tokens covered by masked spans", min=0.0, max=1.0)
    poisson_lambda: float = option(3.0, "mean span length (Poisson) for text infilling", greater_than=0.0)
    permute_sentences: float = option(1.0, "share of sentences shuffled (sentence permutation)", min=0.0, max=1.0)
    mask_token: str = option("<mask>", "sentencepiece user-defined symbol used as the mask token")


@dataclass
class GapSentencesConfig:
    """PEGASUS gap-sentence generation (Zhang et al. 2020): the document's most representative sentences
    (ROUGE-1 against the rest) are masked in the source and generated, in document order, as the target."""

    ratio: float = option(
        0.3,
        "gap-sentence ratio: share of the document's sentences masked and generated "
        "(PEGASUS: 0.3); the target is cut to fit model.max_target_positions",
        greater_than=0.0,
        max=1.0,
    )
    score_noise: float = option(
        0.2,
        "importance scores are multiplied by 1 + U(-x, x), drawn again each "
        "epoch (PEGASUS's stochastic selection; 0 = always the same sentences)",
        min=0.0,
        max=1.0,
    )
    mask_token: str = option("<mask>", "sentencepiece user-defined symbol that replaces each gap sentence")


@dataclass
class SpanCorruptionConfig:
    """T5 span corruption (Raffel et al. 2020): random spans are replaced by sentinels in the source; the
    target lists each sentinel followed by the span it hides."""

    noise_density: float = option(
        0.15,
        "share of source tokens hidden in spans (T5: 0.15); fewer when the "
        "target would not fit model.max_target_positions",
        greater_than=0.0,
        max=0.9,
    )
    mean_noise_span_length: float = option(3.0, "mean length of a hidden span (T5: 3)", min=1.0)
    max_sentinels: int = option(
        100,
        "spans per example at most: one sentinel piece <extra_id_K> each "
        "(pyramidion-preprocess --spm-sentinels N adds them to the vocabulary)",
        min=1,
    )


@dataclass
class DataConfig:
    data: str = option("", "directory of binarized shards written by pyramidion-preprocess")
    task: str = option(
        "summarization",
        "summarization (document -> summary), or a pretraining objective on "
        "unlabeled documents: denoising (BART sentence permutation + text infilling; the target "
        "is the document's first max_target_positions tokens), gap_sentences (PEGASUS) or "
        "span_corruption (T5); the last two take their targets from the whole document",
        choices=("summarization", "denoising", "gap_sentences", "span_corruption"),
    )
    train_subset: str = option("train", "split used for training")
    valid_subset: str = option("valid", "split used for validation")
    max_tokens: Optional[int] = option(8192, "token budget of one batch per rank (source tokens, padded)", min=1)
    max_sentences: Optional[int] = option(
        None, "examples per batch per rank (fairseq --batch-size); used alone or together with max_tokens", min=1
    )
    pad_to_multiple: int = option(0, "pad source length to a multiple of this; 0 = the model's chunk size", min=0)
    required_batch_size_multiple: int = option(
        0,
        "batch sizes are a multiple of this (below it a power of two); 0 = 8 under train.compile "
        "(a bounded number of recompiles), else 1 (any size)",
        min=0,
    )
    target_pad_to_multiple: int = option(
        0, "pad target length to a multiple of this; 0 = 64 under train.compile, else the longest target", min=0
    )
    truncate_source: bool = option(
        True, "truncate sources longer than model.max_source_positions (else such examples are skipped and counted)"
    )
    num_workers: int = option(1, "data loader worker processes", min=0)
    denoising: DenoisingConfig = option(DenoisingConfig(), "BART pretraining noise (task denoising)")
    gap_sentences: GapSentencesConfig = option(GapSentencesConfig(), "PEGASUS gap sentences (task gap_sentences)")
    span_corruption: SpanCorruptionConfig = option(SpanCorruptionConfig(), "T5 span corruption (task span_corruption)")
