"""Binarize split sources into shards: tokenize in parallel, truncate, count, write atomically.

    SplitSource records ──(chunks of ≤64 docs / 256k chars)──> worker pool: spm encode + </s> + truncate
        ──(in order)──> ShardWriter train.source / train.target  +  train.ids.json + train.summaries.jsonl
    ... every split ...  ──> meta.json (written last: vocab size, spm sha256, splits, counts)

Everything is written into a temporary directory beside the destination (``DESTDIR.tmp-XXXX``, same
filesystem) that is renamed into place only when complete; an existing destination is replaced only with
``overwrite`` (moved aside, the new one renamed in, then the old one removed). A failure or an interrupt
at any point leaves the old data-bin as it was and no temporary directory behind.

At most ``4 × workers`` chunks are in flight, so memory stays bounded however large the corpus is.
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import json
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..errors import DataError
from .indexed import FORMAT, ShardWriter, dtype_for_vocab
from .sources import SplitSource
from .spm import EOS_ID, SPM_MODEL, SPM_VOCAB, check_special_ids, load_spm, spm_sha256, train_spm
from .tokenizer import copy_tokenizer, encode_source, imported_tokenizer_dir, special_ids

log = logging.getLogger(__name__)

META = "meta.json"
#: per labeled split: the raw summaries, one JSON object {"id", "summary"} per line, in shard order
SUMMARIES = "{split}.summaries.jsonl"
META_FORMAT = "pyramidion-data-v1"
#: a chunk sent to a worker closes at this many documents or characters, whichever comes first
CHUNK_DOCS = 64
CHUNK_CHARS = 1 << 18
COUNT_KEYS = ("input", "examples", "empty_skipped", "truncated_source", "truncated_target", "dropped_too_long")


# --------------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(
    model_path: str, dtype: str, max_source: Optional[int], max_target: Optional[int], truncate_source: bool
) -> None:
    proc = load_spm(model_path)  # our sentencepiece model, or an imported tokenizer (data/tokenizer.py)
    _WORKER.update(
        proc=proc, dtype=np.dtype(dtype), max_source=max_source, max_target=max_target, truncate_source=truncate_source
    )


def _init_pool_worker(*init_args) -> None:
    """A pool worker ignores SIGTERM: the main process decides (it stops the pool and removes its temporary
    directory), also when the signal reaches every process of the group."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _init_worker(*init_args)


def _with_eos(ids: list[int], limit: Optional[int], dtype, eos: int = EOS_ID) -> tuple[np.ndarray, int]:
    """``ids + [</s>]``, cut to ``limit`` tokens (the last one stays ``</s>``); and its length before the cut
    (longer than the array when it was cut)."""
    full = len(ids) + 1
    if limit is not None and full > limit:
        ids = ids[: limit - 1]
    array = np.empty(len(ids) + 1, dtype=dtype)
    array[:-1] = ids
    array[-1] = eos
    return array, full


def _encode_chunk(chunk: list[tuple[str, str, Optional[str]]]) -> list[tuple]:
    """-> per record ``(status, id, source, target, source_len, target_len)``, the lengths in pieces with
    ``</s>`` before any cut; status is ``ok``, ``empty``, ``too_long`` or ``bad_text`` (then ``source``
    holds the message)."""
    w = _WORKER
    out = []
    for ex_id, document, summary in chunk:
        if not document.strip() or (summary is not None and not summary.strip()):
            out.append(("empty", ex_id, None, None, 0, 0))
            continue
        try:
            src_ids = encode_source(w["proc"], document)
            tgt_ids = w["proc"].EncodeAsIds(summary) if summary is not None else None
        except (UnicodeError, TypeError) as err:
            out.append(("bad_text", ex_id, f"{type(err).__name__}: {err}", None, 0, 0))
            continue
        if not w["truncate_source"] and w["max_source"] and len(src_ids) + 1 > w["max_source"]:
            out.append(("too_long", ex_id, None, None, 0, 0))
            continue
        eos = w["proc"].eos_id()
        source, source_len = _with_eos(src_ids, w["max_source"], w["dtype"], eos)
        target, target_len = (None, 0) if tgt_ids is None else _with_eos(tgt_ids, w["max_target"], w["dtype"], eos)
        out.append(("ok", ex_id, source, target, source_len, target_len))
    return out


def _chunks(records: Iterable, max_docs: int = CHUNK_DOCS, max_chars: int = CHUNK_CHARS) -> Iterator[list]:
    chunk, chars = [], 0
    for record in records:
        if not isinstance(record[1], str) or (record[2] is not None and not isinstance(record[2], str)):
            raise DataError(
                f"example {record[0]!r}: document/summary is not text "
                f"({type(record[1]).__name__}/{type(record[2]).__name__})"
            )
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
            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_pool_worker, initargs=init_args
            )
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
            raise DataError(
                "a tokenizer worker process died (killed, or out of memory?); nothing was "
                "written; retry with fewer --workers"
            ) from None

    def close(self):
        if self.pool is None:
            return
        if self.pool._broken:
            # a worker died: concurrent.futures stops the others with SIGTERM, which they ignore
            # (_init_pool_worker), and would wait for them forever; they hold no work worth keeping
            for process in list((self.pool._processes or {}).values()):
                process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# main side
# --------------------------------------------------------------------------------------------------


def length_stats(lengths) -> dict:
    """Median, 95th percentile and longest of lengths in pieces (``</s>`` included, before any cut)."""
    if not lengths:
        return {"median": 0, "p95": 0, "max": 0}
    values = np.asarray(lengths)
    return {
        "median": int(np.percentile(values, 50, method="lower")),
        "p95": int(np.percentile(values, 95, method="lower")),
        "max": int(values.max()),
    }


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def has_byte_fallback(proc) -> bool:
    """Whether a sentencepiece model spells unknown characters as UTF-8 byte pieces (``<0x00>``...)."""
    piece = proc.PieceToId("<0x00>")
    return piece != proc.unk_id() and bool(proc.IsByte(piece))


def prepare_spm(
    destdir: Path,
    sources: dict[str, SplitSource],
    *,
    spm_model: str | None = None,
    vocab_size: int = 32000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    sample_size: int = 2_000_000,
    user_symbols: tuple[str, ...] = ("<mask>",),
    byte_fallback: Optional[bool] = None,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Copy a given model into ``destdir`` (checking its special ids) or train one on the train split.

    ``byte_fallback``: None (the default) = on when the vocabulary has room for the 256 byte pieces,
    else off with a warning; True = on or a one-line error; False = off.
    """
    from tqdm import tqdm

    destdir.mkdir(parents=True, exist_ok=True)
    imported = imported_tokenizer_dir(spm_model) if spm_model else None
    if imported is not None:  # the tokenizer of a pyramidion-import export (or of a data dir made with one)
        load_spm(imported)  # fails in one line on a broken tokenizer
        copy_tokenizer(imported, destdir)
        return destdir / SPM_MODEL
    if spm_model:
        src = Path(spm_model)
        src = src / SPM_MODEL if src.is_dir() else src
        proc = load_spm(src)
        check_special_ids(proc, str(src), user_symbols)
        shutil.copyfile(src, destdir / SPM_MODEL)
        vocab = src.with_suffix(".vocab")
        lines = (
            vocab.read_text(encoding="utf-8")
            if vocab.is_file()
            else "".join(f"{proc.IdToPiece(i)}\t{proc.GetScore(i)}\n" for i in range(proc.GetPieceSize()))
        )
        (destdir / SPM_VOCAB).write_text(lines, encoding="utf-8")
        return destdir / SPM_MODEL
    if "train" not in sources:
        raise DataError("no train split to learn sentencepiece from; give one or pass --spm-model")
    train = sources["train"]

    def texts():
        for _, document, summary in tqdm(
            train.records(), total=train.num_rows, desc="spm text", unit="doc", disable=not progress
        ):
            yield document or ""
            if summary:
                yield summary

    if progress:
        print(f"training sentencepiece ({model_type}, vocab {vocab_size}) on {train.description}", flush=True)
    return train_spm(
        texts(),
        destdir,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        sample_size=sample_size,
        user_symbols=user_symbols,
        byte_fallback=byte_fallback,
        num_threads=workers,
    )


def binarize_split(
    source: SplitSource,
    destdir: Path,
    *,
    vocab: int,
    sha: str,
    max_source_positions: Optional[int] = None,
    max_target_positions: Optional[int] = None,
    truncate_source: bool = True,
    unlabeled: bool = False,
    workers: int = 1,
    progress: bool = True,
    require_examples: bool = False,
    eos_id: int = EOS_ID,
) -> dict:
    """Write ``<split>.source``, ``<split>.target`` and ``<split>.summaries.jsonl`` (unless unlabeled) and
    ``<split>.ids.json``. The raw summaries are what generation scores against: the targets are cut to
    ``max_target_positions`` and pass through the vocabulary, the summaries are the input's text."""
    from tqdm import tqdm

    split = source.split
    sides = ("source",) if unlabeled else ("source", "target")
    writers = {side: ShardWriter(destdir / f"{split}.{side}", vocab, sha, eos_id) for side in sides}
    summaries_path = destdir / SUMMARIES.format(split=split)
    summaries = (
        None if unlabeled else open(summaries_path.with_name(summaries_path.name + ".tmp"), "w", encoding="utf-8")
    )
    counts = dict.fromkeys(COUNT_KEYS, 0)
    lengths = {side: array.array("l") for side in sides}  # pieces before any cut, per example kept (compact)
    ids: list[str] = []
    encoder = _Encoder(
        workers,
        (
            str(destdir / SPM_MODEL),
            dtype_for_vocab(vocab).name,
            max_source_positions,
            max_target_positions,
            truncate_source,
        ),
    )
    in_flight = collections.deque()  # the chunks sent, in order: results come back in the same order

    def sent(chunks):
        for chunk in chunks:
            in_flight.append(chunk)
            yield chunk

    ok = False
    try:
        bar = tqdm(total=source.num_rows, desc=f"binarize {split}", unit="doc", disable=not progress)
        for results in encoder.map(sent(_chunks(source.records()))):
            chunk = in_flight.popleft()
            for (status, ex_id, src, tgt, src_len, tgt_len), record in zip(results, chunk, strict=True):
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
                    summaries.write(json.dumps({"id": ex_id, "summary": record[2]}, ensure_ascii=False) + "\n")
                counts["examples"] += 1
                counts["truncated_source"] += int(src_len > len(src))
                lengths["source"].append(src_len)
                if not unlabeled:
                    counts["truncated_target"] += int(tgt_len > len(tgt))
                    lengths["target"].append(tgt_len)
                ids.append(ex_id)
            bar.update(len(results))
        bar.close()
        if require_examples and counts["examples"] == 0:
            raise DataError(
                f"{source.description}: no examples left ({counts['empty_skipped']} empty, "
                f"{counts['dropped_too_long']} too long)"
            )
        for writer in writers.values():
            writer.finish(
                {
                    "split": split,
                    "max_positions": max_source_positions if writer is writers["source"] else max_target_positions,
                }
            )
        if summaries is not None:
            summaries.close()
            os.replace(summaries.name, summaries_path)
        _write_json(destdir / f"{split}.ids.json", ids)
        counts["lengths"] = {side: length_stats(values) for side, values in lengths.items()}
        ok = True
    finally:
        encoder.close()
        if not ok:
            for writer in writers.values():
                writer.abort()
            if summaries is not None:
                summaries.close()
                Path(summaries.name).unlink(missing_ok=True)
    return counts


def _first_file(path: Path) -> Optional[Path]:
    """The first existing ancestor of ``path`` (or ``path``) that is not a directory, if any."""
    for candidate in reversed([path, *path.parents]):
        if candidate.exists() and not candidate.is_dir():
            return candidate
        if not candidate.exists():
            return None
    return None


#: the names a data-bin's entries have (with the temporaries of an interrupted older version)
_DATA_BIN_ENTRY = re.compile(
    r"(spm\.(model|vocab)|meta\.json|[^/]+\.(source|target)\.(bin|idx|json)|[^/]+\.ids\.json"
    r"|[^/]+\.summaries\.jsonl)(\.tmp)?|\.spm-.*"
)


def check_destdir(destdir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, in one :class:`DataError` line, a ``destdir`` that is a file or lies under one, that holds
    something while ``overwrite`` is off, or that holds anything but a data-bin's files (even with
    ``overwrite``: it replaces the whole directory). Cheap: the command checks this before reading input."""
    destdir = Path(destdir)
    blocking = _first_file(destdir.absolute())
    if blocking == destdir.absolute():
        raise DataError(f"--destdir {destdir}: is a file, expected a directory (or a path that does not exist)")
    if blocking is not None:
        raise DataError(f"--destdir {destdir}: {blocking} is a file, not a directory")
    if not destdir.is_dir() or not any(destdir.iterdir()):
        return
    if not overwrite:
        raise DataError(
            f"--destdir {destdir}: already exists and is not empty; pass --overwrite to replace it "
            f"(the old one is kept until the new one is complete) or choose another directory"
        )
    foreign = sorted(entry.name for entry in destdir.iterdir() if not _DATA_BIN_ENTRY.fullmatch(entry.name))
    if foreign:  # --overwrite replaces the whole directory: never one that holds anything else
        raise DataError(
            f"--destdir {destdir}: holds {foreign[0]!r}"
            + (f" and {len(foreign) - 1} more entries" if len(foreign) > 1 else "")
            + " that pyramidion-preprocess did not write; refusing to replace it even with --overwrite"
        )


def _temporary_destdir(destdir: Path, overwrite: bool) -> Path:
    """Check ``destdir`` and make the empty directory beside it that preprocessing fills:
    ``DESTDIR.tmp-XXXX`` in the same parent, so the final rename stays on one filesystem."""
    check_destdir(destdir, overwrite)
    parent = destdir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        while True:  # not tempfile.mkdtemp: that makes it 0700, and a data-bin is often shared (umask applies)
            tmp = parent / f"{destdir.name}.tmp-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()
                return tmp
            except FileExistsError:
                continue
    except OSError as err:
        raise DataError(
            f"--destdir {destdir}: cannot write in {parent} ({err.strerror or type(err).__name__})"
        ) from None


def _move_into_place(tmp: Path, destdir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``destdir``; an existing ``destdir`` is moved aside first and removed
    once the new one is in (and moved back if the rename fails)."""
    old = None
    if destdir.is_dir():
        if any(destdir.iterdir()):
            check_destdir(destdir, overwrite)  # something else may have filled it meanwhile
            old = Path(tempfile.mkdtemp(prefix=f"{destdir.name}.old-", dir=destdir.parent))
            os.rename(destdir, old / destdir.name)
        else:
            destdir.rmdir()
    try:
        os.rename(tmp, destdir)
    except BaseException:
        if old is not None:
            os.rename(old / destdir.name, destdir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def preprocess(
    sources: dict[str, SplitSource],
    destdir: str | os.PathLike,
    *,
    spm_model: str | None = None,
    spm_options: dict | None = None,
    max_source_positions: Optional[int] = None,
    max_target_positions: Optional[int] = None,
    truncate_source: bool = True,
    unlabeled: bool = False,
    workers: int = 1,
    progress: bool = True,
    describe: str = "",
    overwrite: bool = False,
) -> dict:
    """The whole of ``pyramidion-preprocess``: spm model, every split, then ``meta.json``, all written into
    a temporary directory that replaces ``destdir`` at the end. Returns meta.

    ``destdir`` must not exist, be empty, or (with ``overwrite``) hold anything: it keeps its old content
    until the new one is complete, whatever happens before.
    """
    destdir = Path(os.path.realpath(destdir) if Path(destdir).is_symlink() else os.path.abspath(destdir))
    tmp = _temporary_destdir(destdir, overwrite)
    try:
        meta = _preprocess_into(
            tmp,
            sources,
            spm_model=spm_model,
            spm_options=spm_options,
            max_source_positions=max_source_positions,
            max_target_positions=max_target_positions,
            truncate_source=truncate_source,
            unlabeled=unlabeled,
            workers=workers,
            progress=progress,
            describe=describe,
        )
        _move_into_place(tmp, destdir, overwrite)
    finally:  # also on KeyboardInterrupt: no temporary directory is left behind
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _preprocess_into(
    destdir: Path,
    sources: dict[str, SplitSource],
    *,
    spm_model,
    spm_options,
    max_source_positions,
    max_target_positions,
    truncate_source,
    unlabeled,
    workers,
    progress,
    describe,
) -> dict:
    spm_options = dict(spm_options or {})
    user_symbols = tuple(spm_options.get("user_symbols", ("<mask>",)))
    prepare_spm(destdir, sources, spm_model=spm_model, workers=workers, progress=progress, **spm_options)
    proc = load_spm(destdir)
    vocab, sha = int(proc.GetPieceSize()), spm_sha256(destdir)
    splits = {}
    for split, source in sources.items():
        counts = binarize_split(
            source,
            destdir,
            vocab=vocab,
            sha=sha,
            max_source_positions=max_source_positions,
            max_target_positions=max_target_positions,
            truncate_source=truncate_source,
            unlabeled=unlabeled,
            workers=workers,
            progress=progress,
            require_examples=split == "train",
            eos_id=proc.eos_id(),
        )
        splits[split] = {
            "sides": ["source"] if unlabeled else ["source", "target"],
            "source": source.description,
            "lengths": counts.pop("lengths"),
            "counts": counts,
        }
        if not unlabeled:
            splits[split]["summaries"] = SUMMARIES.format(split=split)
    meta = {
        "format": META_FORMAT,
        "shard_format": FORMAT,
        "vocab_size": vocab,
        "spm_sha256": sha,
        "dtype": dtype_for_vocab(vocab).name,
        "special_ids": special_ids(proc),
        "user_symbols": [s for s in user_symbols if proc.PieceToId(s) != proc.unk_id()],
        "byte_fallback": has_byte_fallback(proc),
        "unlabeled": unlabeled,
        "max_source_positions": max_source_positions,
        "max_target_positions": max_target_positions,
        "truncate_source": truncate_source,
        "input": describe,
        "splits": splits,
    }
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
    rows = [head] + [(split, *(str(info["counts"][k]) for k in COUNT_KEYS)) for split, info in meta["splits"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    return "\n".join(lines)


def truncation_lines(meta: dict) -> list[str]:
    """Per split, how many sources and targets were cut, to what, and how long they were before
    (``valid: cut 2289 of 2400 targets to 256 pieces (median 301, p95 480, max 911 before)``)."""
    lines = []
    for split, info in meta["splits"].items():
        parts = []
        for side in info["sides"]:
            limit, stats = meta[f"max_{side}_positions"], info["lengths"][side]
            lengths = f"median {stats['median']}, p95 {stats['p95']}, max {stats['max']}"
            kept = info["counts"]["examples"]
            if limit is None:
                parts.append(f"{side}s uncut ({lengths} pieces)")
            elif side == "source" and not meta["truncate_source"]:
                dropped = info["counts"]["dropped_too_long"]
                parts.append(f"dropped {dropped} of {kept + dropped} sources longer than {limit} pieces")
            else:
                parts.append(
                    f"cut {info['counts'][f'truncated_{side}']} of {kept} {side}s to {limit} pieces ({lengths} before)"
                )
        lines.append(f"{split}: " + "; ".join(parts))
    return lines
