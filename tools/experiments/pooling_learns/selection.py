"""Selection recall: the share of the planted sentences' pieces that dominate a slot of the final pyramid stage.

A synthetic document's planted sentences are character spans (``salient_spans``); the document is re-tokenized
with character offsets, the spans become piece positions, and the encoder's final stage says which positions
survived (``EncoderOut.source_positions[mask]``). Used by ``run.py`` (each trained variant) and
``probe_copy.py`` (during its plain-torch training).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def piece_offsets(spm, text: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Sentencepiece ids of ``text`` and each piece's *character* [begin, end) in ``text``.

    Sentencepiece reports byte offsets (``encode(..., out_type="immutable_proto")`` in older releases,
    ``return_type="proto"`` in newer ones); they are mapped to character offsets here so spans computed
    on the Python string compare directly. The ids are exactly ``spm.EncodeAsIds(text)``.
    """
    try:
        proto = spm.encode(text, out_type="immutable_proto")
    except (ValueError, TypeError):
        proto = spm.encode(text, return_type="proto")
    # character index of every byte offset 0..len(bytes) (exclusive ends land on the next character)
    byte_to_char = np.empty(len(text.encode("utf-8")) + 1, dtype=np.int64)
    position = 0
    for index, character in enumerate(text):
        width = len(character.encode("utf-8"))
        byte_to_char[position : position + width] = index
        position += width
    byte_to_char[position] = len(text)
    ids = [p.id for p in proto.pieces]
    begins = byte_to_char[[p.begin for p in proto.pieces]] if ids else np.zeros(0, dtype=np.int64)
    ends = byte_to_char[[p.end for p in proto.pieces]] if ids else np.zeros(0, dtype=np.int64)
    return ids, begins, ends


def salient_token_mask(begins: np.ndarray, ends: np.ndarray, spans: Sequence[Sequence[int]]) -> np.ndarray:
    """n bool: piece i overlaps a salient character span [s, e) (a piece's leading space is outside
    the span, so ``▁agent`` at a sentence start counts, and the filler piece after its ``.`` does not)."""
    mask = np.zeros(len(begins), dtype=bool)
    for start, end in spans:
        mask |= (begins < end) & (ends > start) & (ends > begins)
    return mask


def selection_counts(salient: np.ndarray, kept_positions: Sequence[int]) -> tuple[int, int]:
    """(salient tokens kept, salient tokens) for one document; ``kept_positions``: token positions that
    dominate a real slot of the final stage. Positions beyond ``len(salient)`` (e.g. ``</s>``) are ignored."""
    kept = np.zeros(len(salient), dtype=bool)
    positions = np.asarray([p for p in kept_positions if 0 <= p < len(salient)], dtype=np.int64)
    kept[positions] = True
    return int((kept & salient).sum()), int(salient.sum())


def measure_selection(model, spm, records: list[dict], pad_to_multiple: int, batch_size: int = 4) -> dict:
    """Selection recall of ``model`` over ``records`` (jsonl dicts with ``document`` and ``salient_spans``).

    Each document is encoded as preprocessing does (pieces + ``</s>``, cut to max_source_positions);
    the final stage's kept positions are ``EncoderOut.source_positions[mask]``.
    """
    import torch

    from pyramidion_ds.generate.inputs import Example, truncate_ids
    from pyramidion_ds.generate.runner import collate_sources

    cfg = model.cfg
    docs = []
    for index, record in enumerate(records):
        ids, begins, ends = piece_offsets(spm, record["document"])
        salient = salient_token_mask(begins, ends, record["salient_spans"])
        source = truncate_ids(ids + [cfg.eos_id], cfg.max_source_positions, cfg.eos_id)
        docs.append((Example(index, record.get("id", str(index)), source, None), salient))
    hits = total = truncated = slots = salient_slots = 0
    per_doc, widths = [], []
    with torch.no_grad():
        for start in range(0, len(docs), batch_size):
            batch = docs[start : start + batch_size]
            src, lengths = collate_sources(
                [e for e, _ in batch],
                cfg.pad_id,
                pad_to_multiple,
                cfg.max_source_positions,
                next(model.parameters()).device,
            )
            out = model.encode(src, lengths)
            for row, (example, salient) in enumerate(batch):
                kept = out.source_positions[row][out.mask[row]].tolist()
                visible = len(example.source) - 1  # pieces the model saw (</s> excluded)
                truncated += int(salient[visible:].sum())
                h, t = selection_counts(salient, kept)
                hits, total = hits + h, total + t
                kept_set = set(kept)
                slots += len(kept_set)
                salient_slots += sum(1 for p in kept_set if p < len(salient) and salient[p])
                widths.append((len(example.source), int(out.mask[row].sum())))
                per_doc.append(h / max(t, 1))
    mean_len = float(np.mean([n for n, _ in widths]))
    mean_kept = float(np.mean([k for _, k in widths]))
    return {
        "recall": hits / max(total, 1),
        "recall_mean_per_doc": float(np.mean(per_doc)),
        "recall_min_doc": float(np.min(per_doc)),
        "salient_tokens": total,
        "salient_kept": hits,
        "salient_truncated": truncated,
        "precision": salient_slots / max(slots, 1),  # share of distinct kept positions that are planted
        "final_slots_mean": mean_kept,
        "source_tokens_mean": mean_len,
        "chance_recall": mean_kept / mean_len,
        "documents": len(docs),
    }
