"""Binarized token shards: a flat token file, an index of offsets, a small JSON header.

One shard per (split, side), e.g. ``train.source``::

    train.source.bin    all examples' token ids back to back (uint16 when the vocab fits, else uint32)
    train.source.idx    int64 offsets, one more than the number of examples: example i is bin[o[i]:o[i+1]]
    train.source.json   header: format, dtype, vocab size, spm sha256, counts, length statistics

Every token sequence ends with ``</s>``. The writer fills ``*.tmp`` files and renames them only when the
shard is complete (header last), so a crash never leaves a shard that looks valid. The reader maps the
files lazily on first access and can be pickled into data-loader workers (the maps are re-opened there).

Opening a shard checks that its three files belong together, in one line naming the file when not: the
``.bin`` holds exactly the header's ``num_tokens``, the ``.idx`` has ``num_examples + 1`` offsets rising
from 0 to ``num_tokens``, and every example is non-empty and ends with ``</s>`` (one vectorized gather
of the last tokens: a page per example, never the whole ``.bin``). An index copied from another shard,
a truncated or appended data file, or a header of another split is refused before training reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .spm import EOS_ID

FORMAT = "pyramidion-shard-v1"
SIDES = ("source", "target")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def shard_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    prefix = str(prefix)
    return {"bin": Path(prefix + ".bin"), "idx": Path(prefix + ".idx"), "json": Path(prefix + ".json")}


def length_stats(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {"min": 0, "max": 0, "mean": 0.0, "p50": 0, "p95": 0}
    return {
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 2),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
    }


class ShardWriter:
    """Append token sequences; :meth:`finish` writes the index and header and renames into place."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int, spm_sha256: str, eos_id: int = EOS_ID):
        self.paths = shard_paths(prefix)
        self.tmp = {k: p.with_name(p.name + ".tmp") for k, p in self.paths.items()}
        self.vocab_size, self.spm_sha256 = vocab_size, spm_sha256
        self.eos_id = eos_id  # recorded in the header when it is not ours (an imported tokenizer's)
        self.dtype = dtype_for_vocab(vocab_size)
        for path in self.paths.values():  # an old shard must not survive half-replaced
            path.unlink(missing_ok=True)
        self._bin = open(self.tmp["bin"], "wb")
        self._lengths: list[int] = []

    def add(self, tokens) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes())
        self._lengths.append(len(array))

    def finish(self, extra: dict | None = None) -> dict:
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        offsets.tofile(self.tmp["idx"])
        header = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "spm_sha256": self.spm_sha256,
            "num_examples": int(len(lengths)),
            "num_tokens": int(offsets[-1]),
            "lengths": length_stats(lengths),
            **({} if self.eos_id == EOS_ID else {"eos_id": self.eos_id}),
            **(extra or {}),
        }
        self.tmp["json"].write_text(json.dumps(header, indent=1) + "\n", encoding="utf-8")
        os.replace(self.tmp["bin"], self.paths["bin"])
        os.replace(self.tmp["idx"], self.paths["idx"])
        os.replace(self.tmp["json"], self.paths["json"])  # the header last: it marks completeness
        return header

    def abort(self) -> None:
        self._bin.close()
        for path in self.tmp.values():
            path.unlink(missing_ok=True)


class ShardReader:
    """Random access to one shard through numpy memmaps, opened (and checked) on first access.

    ``expected_sha256``: the spm model hash the caller's vocabulary has; a shard built with another
    model is refused in one line.
    """

    def __init__(self, prefix: str | os.PathLike, expected_sha256: str | None = None):
        self.prefix = str(prefix)
        self.paths = shard_paths(prefix)
        self.expected_sha256 = expected_sha256
        self._header = self._tokens = self._offsets = None

    # pickling for data-loader workers: ship the paths, re-open the maps on the other side
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = state["_offsets"] = None
        return state

    def _open(self) -> None:
        paths = self.paths
        if not paths["json"].is_file():
            raise DataError(
                f"{paths['json']}: missing shard header (incomplete or absent shard; re-run pyramidion-preprocess)"
            )
        try:
            header = json.loads(paths["json"].read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{paths['json']}: unreadable shard header ({err})") from None
        if header.get("format") != FORMAT:
            raise DataError(f"{paths['json']}: format {header.get('format')!r}, expected {FORMAT!r}")
        if self.expected_sha256 and header.get("spm_sha256") != self.expected_sha256:
            raise DataError(
                f"{paths['json']}: built with spm model {str(header.get('spm_sha256'))[:12]}, "
                f"but the vocabulary in use is {self.expected_sha256[:12]}; re-run "
                f"pyramidion-preprocess with this spm model"
            )
        for kind in ("bin", "idx"):
            if not paths[kind].is_file():
                raise DataError(f"{paths[kind]}: missing (header present, data absent)")
        try:
            dtype = np.dtype(header["dtype"])
            n, num_tokens = int(header["num_examples"]), int(header["num_tokens"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{paths['json']}: incomplete shard header ({type(err).__name__}: {err})") from None
        if paths["idx"].stat().st_size != 8 * (n + 1):
            raise DataError(
                f"{paths['idx']}: {paths['idx'].stat().st_size} bytes, expected {8 * (n + 1)} for {n} examples"
            )
        offsets = np.memmap(paths["idx"], dtype=np.int64, mode="r")
        bin_bytes = paths["bin"].stat().st_size
        data_len = bin_bytes // dtype.itemsize
        if offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
            raise DataError(
                f"{paths['idx']}: offsets are not strictly increasing from 0 (corrupt index; every "
                f"example holds at least </s>)"
            )
        if offsets[-1] > data_len:
            raise DataError(
                f"{paths['idx']}: index points past the data file (offset {int(offsets[-1])} > "
                f"{data_len} tokens in {paths['bin'].name})"
            )
        if bin_bytes != num_tokens * dtype.itemsize:
            raise DataError(
                f"{paths['bin']}: {bin_bytes} bytes, expected {num_tokens * dtype.itemsize} "
                f"({num_tokens} {dtype.name} tokens, as its header says)"
            )
        if offsets[-1] != num_tokens:
            raise DataError(
                f"{paths['idx']}: last offset {int(offsets[-1])}, expected {num_tokens} (the header's "
                f"num_tokens; an index of another shard?)"
            )
        if n:  # through a mapping of its own, unmapped right away: the reader's stays untouched
            check = np.memmap(paths["bin"], dtype=dtype, mode="r")
            eos = int(header.get("eos_id", EOS_ID))
            ends = np.flatnonzero(check[np.asarray(offsets[1:]) - 1] != eos)
            del check
            if len(ends):
                raise DataError(
                    f"{paths['bin']}: example {int(ends[0])} (of {n}; {len(ends)} in all) does not end "
                    f"with </s> (id {eos}); the .idx does not belong to this .bin"
                )
        self._header = header
        self._offsets = offsets
        # a zero-length file cannot be memory-mapped
        self._tokens = np.memmap(paths["bin"], dtype=dtype, mode="r") if data_len else np.zeros(0, dtype=dtype)

    @property
    def header(self) -> dict:
        if self._offsets is None:
            self._open()
        return self._header

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._open()
        return self._offsets

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of example ``i`` as an int64 array (a copy: the map stays read-only)."""
        offsets = self.offsets
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples in {self.prefix}")
        i = int(i) % len(self)
        return np.array(self._tokens[offsets[i] : offsets[i + 1]], dtype=np.int64)
