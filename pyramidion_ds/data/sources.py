"""Where raw examples come from: a Hugging Face dataset, local files, or the original release's TSVs.

Every source becomes, per split of ours (``train``, ``valid``, ``test``), a :class:`SplitSource` that
yields ``(id, document, summary)`` records (``summary`` is None for unlabeled data). Problems a user can
fix (missing or empty file, missing column, bytes that are not UTF-8, a JSON line that does not parse, a
document that is a number, unreadable file) are one-line :class:`DataError`s that name the file and the
line or row, raised before any tokenization starts (a non-text value in a csv/parquet row: when the row
is read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import DataError

SPLITS = ("train", "valid", "test")
#: the original release's split folders -> ours
TSV_SPLITS = {"train": "train", "valid": "dev-0", "test": "test-A"}
#: Hugging Face split names tried by default for each of ours
DEFAULT_HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: compressed text files (train.jsonl.gz, ...): read as they are, by us and by the datasets library
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}

Record = tuple[str, str, Optional[str]]


@dataclass
class SplitSource:
    split: str
    description: str
    num_rows: Optional[int]
    _records: Callable[[], Iterator[Record]] = field(repr=False)

    def records(self) -> Iterator[Record]:
        return self._records()


def parse_mapping(text: str, flag: str, allowed_keys=SPLITS) -> dict[str, str]:
    """``train=a,valid=b`` -> {"train": "a", "valid": "b"}, keys checked against ``allowed_keys``."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise DataError(f"{flag}: got {item!r}, expected SPLIT=VALUE (e.g. train=train.jsonl)")
        if key not in allowed_keys:
            raise DataError(f"{flag}: unknown split {key!r}, expected one of {', '.join(allowed_keys)}")
        mapping[key] = value
    if not mapping:
        raise DataError(f"{flag}: empty, expected SPLIT=VALUE[,SPLIT=VALUE...]")
    return mapping


def split_suffixes(path: Path) -> tuple[str, Optional[str]]:
    """``train.jsonl.gz`` -> (".jsonl", "gzip"); ``train.jsonl`` -> (".jsonl", None)."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(path.stem).suffix.lower(), COMPRESSIONS[suffix]
    return suffix, None


def _decoded(path: Path, fh) -> Iterator[str]:
    for line_no, raw in enumerate(fh, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: line {line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
            ) from None


def utf8_lines(path: Path) -> Iterator[str]:
    """The file's lines decoded strictly (a .gz/.bz2/.xz file decompressed); the first bytes that are not
    UTF-8 are a one-line error that names the line and column, a damaged archive one that names the file."""
    compression = split_suffixes(path)[1]
    if compression is None:
        with open(path, "rb") as fh:
            yield from _decoded(path, fh)
        return
    import importlib
    import lzma

    try:
        with importlib.import_module(compression).open(path, "rb") as fh:
            yield from _decoded(path, fh)
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"{path}: cannot be decompressed ({err}); expected a complete {compression} file") from None


def check_utf8(path: Path) -> None:
    for _ in utf8_lines(path):
        pass


def json_kind(value) -> str:
    """How a user would name a JSON value's type: 'a number', 'a list', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def check_jsonl(path: Path, text_fields: tuple[str, ...]) -> int:
    """Read a JSON-lines file once before the datasets library does, so that a bad line is one error
    naming its line: not UTF-8, not JSON, not an object, or a text field holding something other than
    text (or null). Returns the number of objects; an empty file (no objects) is an error too."""
    import json

    rows = 0
    for line_no, line in enumerate(utf8_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line_no}: {json_kind(record)}, expected a JSON object per line")
        for name in text_fields:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: line {line_no}: field {name!r} is {json_kind(value)}, expected text")
        rows += 1
    if rows == 0:
        raise DataError(f"{path}: empty file, expected one JSON object per line")
    return rows


# --------------------------------------------------------------------------------------------------
# the original release: <split>/in.tsv (documents) + <split>/expected.tsv (summaries), one per line
# --------------------------------------------------------------------------------------------------


def _tsv_lines(path: Path) -> Iterator[str]:
    return (line.rstrip("\r\n") for line in utf8_lines(path))


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))


def tsv_sources(tsv_dir: str | os.PathLike, unlabeled: bool = False) -> dict[str, SplitSource]:
    root = Path(tsv_dir)
    if not root.is_dir():
        raise DataError(f"--tsv-dir {root}: not a directory")
    sources = {}
    for ours, theirs in TSV_SPLITS.items():
        docs = root / theirs / "in.tsv"
        if not docs.is_file():
            continue
        sums = root / theirs / "expected.tsv"
        if not unlabeled and not sums.is_file():
            raise DataError(f"{sums}: missing (summaries for {docs}); pass --unlabeled for documents only")
        n_docs = _count_lines(docs)
        if docs.stat().st_size == 0:
            raise DataError(f"{docs}: empty file, expected one document per line")
        if not unlabeled:
            n_sums = _count_lines(sums)
            if n_sums != n_docs:
                raise DataError(f"{sums}: {n_sums} lines, but {docs} has {n_docs}; expected one summary per document")

        def records(split=ours, docs=docs, sums=sums):
            summaries = _tsv_lines(sums) if not unlabeled else None
            for i, document in enumerate(_tsv_lines(docs)):
                yield f"{split}-{i}", document, (next(summaries) if summaries else None)

        sources[ours] = SplitSource(ours, str(root / theirs), n_docs, records)
    if not sources:
        raise DataError(f"--tsv-dir {root}: none of {', '.join(f'{s}/in.tsv' for s in TSV_SPLITS.values())} found")
    return sources


# --------------------------------------------------------------------------------------------------
# anything the `datasets` library reads: local files or a dataset by name (offline cache honoured)
# --------------------------------------------------------------------------------------------------


def _dataset_records(
    ds, split: str, where: str, document_column: str, summary_column: str, unlabeled: bool, id_column: str = "id"
) -> SplitSource:
    columns = list(ds.column_names)
    needed = [document_column] + ([] if unlabeled else [summary_column])
    for column, flag in zip(needed, ("--document-column", "--summary-column"), strict=False):
        if column not in columns:
            raise DataError(f"{where}: no column {column!r} (columns: {', '.join(columns)}); set {flag}")
    has_id = id_column in columns
    keep = needed + ([id_column] if has_id else [])

    def text(row, column, i):
        value = row[column]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: row {i + 1}: column {column!r} is {json_kind(value)}, expected text")
        return value or ""

    def records():
        for i, row in enumerate(ds.select_columns(keep)):
            yield (
                str(row[id_column]) if has_id else f"{split}-{i}",
                text(row, document_column, i),
                None if unlabeled else text(row, summary_column, i),
            )

    return SplitSource(split, where, len(ds), records)


def _load(loader: Callable, where: str):
    try:
        return loader()
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"{where}: {str(err).splitlines()[0] if str(err) else 'not found'}") from None
    except Exception as err:  # the datasets library raises many types; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"{where}: cannot be read ({type(err).__name__}: {first})") from None


def file_sources(
    spec: dict[str, str], document_column: str = "document", summary_column: str = "summary", unlabeled: bool = False
) -> dict[str, SplitSource]:
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # converting a local file is quick; our own bars follow
    sources = {}
    for split, path_text in spec.items():
        path = Path(path_text)
        if not path.is_file():
            raise DataError(f"--source-files {split}={path}: no such file")
        suffix, compression = split_suffixes(path)
        if suffix not in FILE_FORMATS or (compression and suffix == ".parquet"):
            given = "".join(path.suffixes[-2:]) if compression else path.suffix
            raise DataError(
                f"{path}: unknown file type {given!r}, expected one of {', '.join(FILE_FORMATS)} "
                f"(text formats also as {'/'.join(COMPRESSIONS)})"
            )
        fmt = FILE_FORMATS[suffix]
        if suffix == ".jsonl":  # an empty one included
            check_jsonl(path, (document_column,) + (() if unlabeled else (summary_column,)))
        elif path.stat().st_size == 0:
            raise DataError(
                f"{path}: empty file, expected examples with columns {document_column!r}"
                + ("" if unlabeled else f" and {summary_column!r}")
            )
        elif fmt != "parquet":
            check_utf8(path)
        ds = _load(
            lambda fmt=fmt, path=path: datasets.load_dataset(fmt, data_files={"data": str(path)}, split="data"),
            str(path),
        )
        sources[split] = _dataset_records(ds, split, str(path), document_column, summary_column, unlabeled)
    return sources


def hub_sources(
    name: str,
    config: str | None = None,
    split_map: dict[str, str] | None = None,
    document_column: str = "document",
    summary_column: str = "summary",
    unlabeled: bool = False,
) -> dict[str, SplitSource]:
    """A dataset by name (or local folder) through ``datasets.load_dataset``; with ``HF_DATASETS_OFFLINE=1``
    only the local cache is used. Without ``split_map`` the usual names are tried and absent ones skipped."""
    import datasets

    datasets.logging.set_verbosity_error()
    where = f"--source-dataset {name}" + (f" ({config})" if config else "")
    loaded = _load(lambda: datasets.load_dataset(name, config), where)
    available = list(loaded.keys())
    sources = {}
    for ours, theirs in (split_map or DEFAULT_HF_SPLITS).items():
        if theirs not in loaded:
            if split_map:
                raise DataError(f"{where}: no split {theirs!r} (splits: {', '.join(available)}); fix --split-map")
            continue
        sources[ours] = _dataset_records(
            loaded[theirs], ours, f"{where} split {theirs!r}", document_column, summary_column, unlabeled
        )
    if not sources:
        raise DataError(
            f"{where}: none of the splits {', '.join(DEFAULT_HF_SPLITS.values())} "
            f"(splits: {', '.join(available)}); set --split-map"
        )
    return sources
