"""Data: sentencepiece, binarized mmap shards, datasets, token-budget batching, pretraining objectives.

    pyramidion-preprocess ─ sources.py (HF name | files | in.tsv) ─ spm.py ─ binarize.py ─ indexed.py
    pyramidion-train      ─ dataset.py (summarization, pretraining objectives, collate) ─ batching.py (batches, sampler)

Names are imported lazily, so ``pyramidion-preprocess`` does not pay for torch, nor the trainer for
``datasets``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BOS_ID": "spm",
    "PAD_ID": "spm",
    "EOS_ID": "spm",
    "UNK_ID": "spm",
    "SPECIAL_IDS": "spm",
    "load_spm": "spm",
    "decode_text": "spm",
    "spm_sha256": "spm",
    "vocab_size": "spm",
    "train_spm": "spm",
    "spm_identity": "spm",
    "same_vocabulary": "spm",
    "ShardReader": "indexed",
    "ShardWriter": "indexed",
    "preprocess": "binarize",
    "read_meta": "binarize",
    "SummarizationDataset": "dataset",
    "DenoisingDataset": "dataset",
    "GapSentencesDataset": "dataset",
    "SpanCorruptionDataset": "dataset",
    "pretraining_dataset": "dataset",
    "collate": "dataset",
    "make_batches": "batching",
    "ShardedBatchSampler": "batching",
    "add_noise": "denoise",
    "text_infill": "denoise",
    "permute_sentences": "denoise",
    "gap_sentences": "denoise",
    "span_corruption": "denoise",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyramidion_ds.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
