"""What to summarize: a split of a binarized data dir, or a text / jsonl file; batches and rank shards.

Every source becomes an :class:`Example` (ids ending with ``</s>``, cut to ``max_source_positions``).
Batches are formed once for the whole input, identically for any number of processes (sorted by
length, packed by ``batch_size`` / ``max_tokens``), then dealt round-robin to the ranks::

    examples (input order) ──sort by length──> b0 b1 b2 b3 b4     world_size 2:  rank 0: b0 b2 b4
                                                                                 rank 1: b1 b3

so a batch holds the same sources whatever the world size, and each rank decodes exactly what a
single process would have decoded for those sources.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Example:
    index: int  #: position in the input (output order)
    id: str  #: id from the input (data dir ids, jsonl "id", or the line number)
    source: np.ndarray  #: token ids ending with </s>, at most max_source_positions
    reference: Optional[str]  #: reference summary text, when the input has one


@dataclass
class Inputs:
    examples: list[Example]
    num_truncated: int  #: sources longer than max_source_positions, cut (keeping </s>)
    original_lengths: list[int]


def truncate_ids(ids: list[int] | np.ndarray, limit: int, eos_id: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) <= limit:
        return ids
    out = ids[:limit].copy()
    out[-1] = eos_id
    return out


def raw_references(data_dir: str | Path, split: str, ids: Optional[list]) -> Optional[list[str]]:
    """The raw summaries pyramidion-preprocess kept for ``split`` (``<split>.summaries.jsonl``), checked
    against the split's ``ids`` (one per example, in shard order), or None for a data dir written before
    preprocess kept them."""
    from ..data.binarize import SUMMARIES

    path = Path(data_dir) / SUMMARIES.format(split=split)
    if not path.is_file():
        return None
    references, summary_ids = [], []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
                references.append(record["summary"])
                summary_ids.append(record.get("id"))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise DataError(f'{path}: line {line_no}: expected an object with a "summary"') from None
    if ids is not None and summary_ids != ids:
        raise DataError(
            f"{path}: {len(references)} summaries that are not those of the {len(ids)} examples in "
            f"{split}.ids.json; re-run pyramidion-preprocess"
        )
    return references


def from_data_dir(
    data_dir: str | Path,
    split: str,
    max_source_positions: int,
    spm,
    eos_id: int,
    expected_vocabulary: Optional[dict] = None,
    recorded_model: Optional[Path] = None,
) -> Inputs:
    """Split ``split`` of a pyramidion-preprocess output. References are the raw summaries preprocess kept
    (what ``--input FILE.jsonl`` scores against too); a data dir written before it kept them falls back to
    the detokenized targets, which are cut to ``max_target_positions`` and lose what the vocabulary
    cannot spell (a warning says so).

    ``expected_vocabulary``: what the model records of its vocabulary (``spm_identity`` and/or
    ``spm_sha256``, as in ``export.json``; ``recorded_model``: the model's own ``spm.model``, which settles
    records that hold the file's sha256 only); data binarized with another vocabulary is refused."""
    from ..data.dataset import open_shard
    from ..data.spm import same_vocabulary, spm_identity, spm_sha256

    if (
        expected_vocabulary
        and same_vocabulary(expected_vocabulary, spm_identity(data_dir), spm_sha256(data_dir), recorded_model) is False
    ):
        raise DataError(
            f"{data_dir}: its spm.model is not the vocabulary the model was trained with; "
            f"binarize the data with the model's spm.model"
        )
    source = open_shard(data_dir, split, "source")
    try:
        target = open_shard(data_dir, split, "target")
    except DataError:
        target = None  # unlabeled: generate without references
    ids_path = Path(data_dir) / f"{split}.ids.json"
    ids = json.loads(ids_path.read_text(encoding="utf-8")) if ids_path.is_file() else None
    if ids is not None and len(ids) != len(source):
        raise DataError(f"{ids_path}: {len(ids)} ids, but the {split} shards hold {len(source)} examples")
    references = raw_references(data_dir, split, ids) if target is not None else None
    if references is not None and len(references) != len(source):
        raise DataError(
            f"{data_dir}: {len(references)} raw summaries for {len(source)} {split} examples; re-run "
            f"pyramidion-preprocess"
        )
    if target is not None and references is None:
        log.warning(
            f"{data_dir}: no {split}.summaries.jsonl (written by pyramidion-preprocess before it kept the "
            f"raw summaries); scoring against the decoded targets, which are truncated and lose "
            f"characters the vocabulary lacks: re-run pyramidion-preprocess for honest ROUGE"
        )
    examples, lengths = [], []
    for i in range(len(source)):
        tokens = source[i]
        lengths.append(len(tokens))
        reference = None
        if references is not None:
            reference = references[i]
        elif target is not None:
            body = [int(t) for t in target[i] if t != eos_id]
            reference = spm.DecodeIds(body)
        examples.append(
            Example(i, str(ids[i]) if ids else str(i), truncate_ids(tokens, max_source_positions, eos_id), reference)
        )
    return Inputs(examples, sum(n > max_source_positions for n in lengths), lengths)


def from_file(path: str | Path, max_source_positions: int, spm, eos_id: int) -> Inputs:
    """One document per line (plain text), or jsonl objects with "document" [+ "summary", "id"]."""
    from ..data.sources import _tsv_lines, json_kind
    from ..data.tokenizer import encode_source

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    is_jsonl = path.suffix in (".jsonl", ".json")
    examples, lengths = [], []
    for line_no, line in enumerate(_tsv_lines(path), 1):
        reference, example_id = None, str(line_no - 1)
        if is_jsonl:
            if not line.strip():
                continue  # blank lines between json objects are harmless
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("document"), str):
                got = json_kind(record.get("document")) if isinstance(record, dict) else json_kind(record)
                raise DataError(f'{path}: line {line_no}: expected an object with a "document" string, got {got}')
            document = record["document"]
            reference = record.get("summary")
            if reference is not None and not isinstance(reference, str):
                raise DataError(f"{path}: line {line_no}: field 'summary' is {json_kind(reference)}, expected text")
            example_id = str(record.get("id", example_id))
        else:
            document = line
        if not document.strip():
            raise DataError(f"{path}: line {line_no}: empty document")
        tokens = encode_source(spm, document) + [eos_id]
        lengths.append(len(tokens))
        examples.append(
            Example(len(examples), example_id, truncate_ids(tokens, max_source_positions, eos_id), reference)
        )
    if not examples:
        raise DataError(f"--input {path}: no documents")
    return Inputs(examples, sum(n > max_source_positions for n in lengths), lengths)


def batches_for_rank(
    examples: list[Example], batch_size: int, max_tokens: int, pad_to_multiple: int, rank: int, world_size: int
) -> list[list[Example]]:
    """This rank's batches (round-robin over one length-sorted batching of all examples)."""
    from ..data.batching import make_batches

    sizes = [len(e.source) for e in examples]
    batches = make_batches(
        sizes, max_tokens=max_tokens or None, max_sentences=batch_size, pad_to_multiple=pad_to_multiple, seed=0, epoch=0
    )
    return [[examples[i] for i in batch] for batch in batches[rank::world_size]]
