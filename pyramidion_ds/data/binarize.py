"""Binarize split sources into shards: tokenize in parallel, truncate, count, write atomically.

    SplitSource records ──(chunks of ≤64 docs / 256k chars)──> worker pool: spm encode + </s> + truncate
        ──(in order)──> ShardWriter train.source / train.target  +  train.ids.json
    ... every split ...  ──> meta.json (written last: vocab size, spm sha256, splits, counts)

At most ``4 × workers`` chunks are in flight, so memory stays bounded however large the corpus is.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .errors import DataError
from .indexed import FORMAT, ShardWriter, dtype_for_vocab
from .sources import SplitSource
from .spm import EOS_ID, SPM_MODEL, SPM_VOCAB, SPECIAL_IDS, check_special_ids, load_spm, spm_sha256, \
    train_spm

META = "meta.json"
META_FORMAT = "pyramidion-data-v1"
#: a chunk sent to a worker closes at this many documents or characters, whichever comes first
CHUNK_DOCS = 64
CHUNK_CHARS = 1 << 18
COUNT_KEYS = ("input", "examples", "empty_skipped", "truncated_source", "truncated_target",
              "dropped_too_long")


# --------------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(model_path: str, dtype: str, max_source: Optional[int], max_target: Optional[int],
                 truncate_source: bool) -> None:
    import sentencepiece as spm
    proc = spm.SentencePieceProcessor()
    proc.Load(model_path)
    _WORKER.update(proc=proc, dtype=np.dtype(dtype), max_source=max_source, max_target=max_target,
                   truncate_source=truncate_source)


def _with_eos(ids: list[int], limit: Optional[int], dtype) -> tuple[np.ndarray, bool]:
    """``ids + [</s>]``, cut to ``limit`` tokens (the last one stays ``</s>``); and whether it was cut."""
    cut = limit is not None and len(ids) + 1 > limit
    if cut:
        ids = ids[:limit - 1]
    array = np.empty(len(ids) + 1, dtype=dtype)
    array[:-1] = ids
    array[-1] = EOS_ID
    return array, cut


def _encode_chunk(chunk: list[tuple[str, str, Optional[str]]]) -> list[tuple]:
    """-> per record ``(status, id, source, target, source_cut, target_cut)``; status is ``ok``,
    ``empty``, ``too_long`` or ``bad_text`` (then ``source`` holds the message)."""
    w = _WORKER
    out = []
    for ex_id, document, summary in chunk:
        if not document.strip() or (summary is not None and not summary.strip()):
            out.append(("empty", ex_id, None, None, False, False))
            continue
        try:
            src_ids = w["proc"].EncodeAsIds(document)
            tgt_ids = w["proc"].EncodeAsIds(summary) if summary is not None else None
        except (UnicodeError, TypeError) as err:
            out.append(("bad_text", ex_id, f"{type(err).__name__}: {err}", None, False, False))
            continue
        if not w["truncate_source"] and w["max_source"] and len(src_ids) + 1 > w["max_source"]:
            out.append(("too_long", ex_id, None, None, False, False))
            continue
        source, source_cut = _with_eos(src_ids, w["max_source"], w["dtype"])
        target, target_cut = (None, False) if tgt_ids is None else _with_eos(tgt_ids, w["max_target"],
                                                                               w["dtype"])
        out.append(("ok", ex_id, source, target, source_cut, target_cut))
    return out


def _chunks(records: Iterable, max_docs: int = CHUNK_DOCS, max_chars: int = CHUNK_CHARS) -> Iterator[list]:
    chunk, chars = [], 0
    for record in records:
        if not isinstance(record[1], str) or (record[2] is not None and not isinstance(record[2], str)):
            raise DataError(f"example {record[0]!r}: document/summary is not text "
                            f"({type(record[1]).__name__}/{type(record[2]).__name__})")
        chunk.append(record)
        chars += len(record[1]) + len(record[2] or "")
        if len(chunk) == max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _Encoder:
    """Ordered, bounded parallel map of :func:`_encode_chunk` (in-process when workers <= 1).

    A process pool from ``concurrent.futures``: when a worker dies (killed, out of memory) the pending
    results raise ``BrokenProcessPool`` instead of waiting forever, as ``multiprocessing.Pool`` would.
    """

    def __init__(self, workers: int, init_args: tuple):
        self.workers = workers
        self.init_args = init_args
        self.pool = None
        if workers > 1:
            # fork: workers need only numpy + sentencepiece, and forkserver/spawn would re-run a caller's
            # unguarded __main__ script
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                               initializer=_init_worker, initargs=init_args)
        else:
            _init_worker(*init_args)

    def map(self, chunks: Iterator[list]) -> Iterator[list]:
        if self.pool is None:
            yield from map(_encode_chunk, chunks)
            return
        pending = collections.deque()
        try:
            for chunk in chunks:
                pending.append(self.pool.submit(_encode_chunk, chunk))
                if len(pending) >= 4 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError("a tokenizer worker process died (killed, or out of memory?); nothing was "
                            "written; retry with fewer --workers") from None

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# main side
# --------------------------------------------------------------------------------------------------

def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_spm(destdir: Path, sources: dict[str, SplitSource], *, spm_model: str | None = None,
                vocab_size: int = 32000, model_type: str = "unigram", character_coverage: float = 0.9995,
                sample_size: int = 2_000_000, user_symbols: tuple[str, ...] = ("<mask>",),
                workers: int = 1, progress: bool = True) -> Path:
    """Copy a given model into ``destdir`` (checking its special ids) or train one on the train split."""
    from tqdm import tqdm
    destdir.mkdir(parents=True, exist_ok=True)
    if spm_model:
        src = Path(spm_model)
        proc = load_spm(src)
        check_special_ids(proc, str(src), user_symbols)
        if src.resolve() != (destdir / SPM_MODEL).resolve():
            tmp = destdir / (SPM_MODEL + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, destdir / SPM_MODEL)
            vocab = src.with_suffix(".vocab")
            lines = (vocab.read_text(encoding="utf-8") if vocab.is_file() else
                     "".join(f"{proc.IdToPiece(i)}\t{proc.GetScore(i)}\n" for i in range(proc.GetPieceSize())))
            (destdir / SPM_VOCAB).write_text(lines, encoding="utf-8")
        return destdir / SPM_MODEL
    if "train" not in sources:
        raise DataError("no train split to learn sentencepiece from; give one or pass --spm-model")
    train = sources["train"]

    def texts():
        for _, document, summary in tqdm(train.records(), total=train.num_rows, desc="spm text",
                                         unit="doc", disable=not progress):
            yield document or ""
            if summary:
                yield summary

    if progress:
        print(f"training sentencepiece ({model_type}, vocab {vocab_size}) on {train.description}", flush=True)
    return train_spm(texts(), destdir, vocab_size=vocab_size, model_type=model_type,
                     character_coverage=character_coverage, sample_size=sample_size,
                     user_symbols=user_symbols, num_threads=workers)


def binarize_split(source: SplitSource, destdir: Path, *, vocab: int, sha: str,
                   max_source_positions: Optional[int] = None, max_target_positions: Optional[int] = None,
                   truncate_source: bool = True, unlabeled: bool = False, workers: int = 1,
                   progress: bool = True, require_examples: bool = False) -> dict:
    """Write ``<split>.source``, ``<split>.target`` (unless unlabeled) and ``<split>.ids.json``."""
    from tqdm import tqdm
    split = source.split
    sides = ("source",) if unlabeled else ("source", "target")
    writers = {side: ShardWriter(destdir / f"{split}.{side}", vocab, sha) for side in sides}
    counts = dict.fromkeys(COUNT_KEYS, 0)
    ids: list[str] = []
    encoder = _Encoder(workers, (str(destdir / SPM_MODEL), dtype_for_vocab(vocab).name, max_source_positions,
                                 max_target_positions, truncate_source))
    ok = False
    try:
        bar = tqdm(total=source.num_rows, desc=f"binarize {split}", unit="doc", disable=not progress)
        for results in encoder.map(_chunks(source.records())):
            for status, ex_id, src, tgt, src_cut, tgt_cut in results:
                counts["input"] += 1
                if status == "bad_text":
                    raise DataError(f"{source.description}: example {ex_id!r}: text cannot be tokenized ({src})")
                if status == "empty":
                    counts["empty_skipped"] += 1
                    continue
                if status == "too_long":
                    counts["dropped_too_long"] += 1
                    continue
                writers["source"].add(src)
                if not unlabeled:
                    writers["target"].add(tgt)
                counts["examples"] += 1
                counts["truncated_source"] += int(src_cut)
                counts["truncated_target"] += int(tgt_cut)
                ids.append(ex_id)
            bar.update(len(results))
        bar.close()
        if require_examples and counts["examples"] == 0:
            raise DataError(f"{source.description}: no examples left ({counts['empty_skipped']} empty, "
                            f"{counts['dropped_too_long']} too long)")
        for writer in writers.values():
            writer.finish({"split": split, "max_positions": max_source_positions if writer is writers["source"]
                           else max_target_positions})
        _write_json(destdir / f"{split}.ids.json", ids)
        ok = True
    finally:
        encoder.close()
        if not ok:
            for writer in writers.values():
                writer.abort()
    return counts


def preprocess(sources: dict[str, SplitSource], destdir: str | os.PathLike, *, spm_model: str | None = None,
               spm_options: dict | None = None, max_source_positions: Optional[int] = None,
               max_target_positions: Optional[int] = None, truncate_source: bool = True,
               unlabeled: bool = False, workers: int = 1, progress: bool = True,
               describe: str = "") -> dict:
    """The whole of ``pyramidion-preprocess``: spm model, every split, then ``meta.json``. Returns meta."""
    destdir = Path(destdir)
    destdir.mkdir(parents=True, exist_ok=True)
    (destdir / META).unlink(missing_ok=True)     # no meta.json until every shard is written
    spm_options = dict(spm_options or {})
    user_symbols = tuple(spm_options.get("user_symbols", ("<mask>",)))
    prepare_spm(destdir, sources, spm_model=spm_model, workers=workers, progress=progress, **spm_options)
    proc = load_spm(destdir)
    vocab, sha = int(proc.GetPieceSize()), spm_sha256(destdir)
    splits = {}
    for split, source in sources.items():
        counts = binarize_split(source, destdir, vocab=vocab, sha=sha, max_source_positions=max_source_positions,
                                max_target_positions=max_target_positions, truncate_source=truncate_source,
                                unlabeled=unlabeled, workers=workers, progress=progress,
                                require_examples=split == "train")
        splits[split] = {"sides": ["source"] if unlabeled else ["source", "target"], "source": source.description,
                         "counts": counts}
    meta = {"format": META_FORMAT, "shard_format": FORMAT, "vocab_size": vocab, "spm_sha256": sha,
            "dtype": dtype_for_vocab(vocab).name, "special_ids": SPECIAL_IDS,
            "user_symbols": [s for s in user_symbols if proc.PieceToId(s) != proc.unk_id()],
            "unlabeled": unlabeled, "max_source_positions": max_source_positions,
            "max_target_positions": max_target_positions, "truncate_source": truncate_source,
            "input": describe, "splits": splits}
    _write_json(destdir / META, meta)
    return meta


def read_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / META
    if not path.is_file():
        raise DataError(f"{path}: missing; {data_dir} is not a finished pyramidion-preprocess output")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != META_FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
    return meta


def summary_table(meta: dict) -> str:
    """The end-of-run report: one row of counts per split."""
    head = ("split", *COUNT_KEYS)
    rows = [head] + [(split, *(str(info["counts"][k]) for k in COUNT_KEYS))
                     for split, info in meta["splits"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines)
