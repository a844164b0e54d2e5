"""Imported tokenizers (PEGASUS's sentencepiece with its own special ids, BART's byte-level BPE) behind the
subset of :class:`sentencepiece.SentencePieceProcessor` the pipeline uses.

A data dir or export dir holds its vocabulary as::

    spm.model                  our own sentencepiece model (fairseq ids: <s>=0 <pad>=1 </s>=2 <unk>=3)
    spm.model + tokenizer.json PEGASUS: the checkpoint's sentencepiece model, ids shifted by ``offset``
                               (0 <pad>, 1 </s>, 2 <mask_1>, 3 <mask_2>, 4..offset-1 <unk_2>.., then
                               the pieces: sentencepiece id p is p + offset)
    bpe.json + tokenizer.json  BART: a ``tokenizers`` byte-level BPE (Hugging Face's tokenizer.json
                               format, saved as bpe.json), sources framed as <s> ... </s>

``tokenizer.json`` records the family and its special ids. :func:`load_tokenizer` returns a plain
``SentencePieceProcessor`` for our own vocabulary and an adapter with the same methods for the others,
so binarization, the vocabulary identity and generation's detokenization treat all three alike.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from ..errors import DataError

TOKENIZER_META = "tokenizer.json"
BPE_FILE = "bpe.json"
SPM_FILE = "spm.model"
PEGASUS_OFFSET = 103


def tokenizer_meta(directory: str | os.PathLike) -> dict | None:
    """The ``tokenizer.json`` of a data/export dir, or None for our own sentencepiece vocabulary."""
    path = Path(directory) / TOKENIZER_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if meta.get("family") not in ("pegasus", "bart"):
        raise DataError(f"{path}: family {meta.get('family')!r}, expected pegasus or bart")
    return meta


def imported_tokenizer_dir(path: str | os.PathLike) -> Path | None:
    """The dir holding an imported tokenizer that ``path`` names (the dir, or its spm.model / bpe.json),
    or None when ``path`` is one of our own sentencepiece models (or dirs)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if not (directory / TOKENIZER_META).is_file():
        return None
    return directory if path.is_dir() or path.name in (SPM_FILE, BPE_FILE) else None


def tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The files that make up the vocabulary of a data/export dir (what gets copied and hashed)."""
    directory = Path(directory)
    meta = tokenizer_meta(directory)
    if meta is None:
        return [directory / SPM_FILE]
    main = directory / (BPE_FILE if meta["family"] == "bart" else SPM_FILE)
    return [main, directory / TOKENIZER_META]


def copy_tokenizer(src_dir: str | os.PathLike, dest_dir: str | os.PathLike) -> None:
    """Copy the vocabulary files of ``src_dir`` into ``dest_dir``."""
    for path in tokenizer_files(src_dir):
        if not path.is_file():
            raise DataError(f"{path}: missing (the tokenizer of {src_dir})")
        shutil.copyfile(path, Path(dest_dir) / path.name)


class _Adapter:
    """The SentencePieceProcessor methods the pipeline calls, for an imported tokenizer."""

    def __init__(self, meta: dict):
        self.meta = meta
        ids = meta["special_ids"]
        self._bos, self._pad, self._eos, self._unk = ids["bos"], ids["pad"], ids["eos"], ids["unk"]
        self.add_bos = bool(meta.get("add_bos", False))

    def bos_id(self) -> int:
        return self._bos

    def pad_id(self) -> int:
        return self._pad

    def eos_id(self) -> int:
        return self._eos

    def unk_id(self) -> int:
        return self._unk

    def EncodeAsIds(self, text: str) -> list[int]:  # noqa: N802 - sentencepiece's name
        """Text -> ids without <s> and </s> (see :func:`encode_source` for a source's framing)."""
        return self._encode(text)

    def IsByte(self, piece_id: int) -> bool:  # noqa: N802
        return False

    def GetScore(self, piece_id: int) -> float:  # noqa: N802
        return 0.0

    def IsControl(self, piece_id: int) -> bool:  # noqa: N802
        return piece_id in self.special_set

    def DecodeIds(self, ids: Iterable[int]) -> str:  # noqa: N802
        return self._decode([int(i) for i in ids if int(i) not in self.special_set])


class PegasusSpm(_Adapter):
    """PEGASUS's sentencepiece model with ``offset`` reserved ids in front (as transformers'
    ``PegasusTokenizer``): sentencepiece piece p is id p + offset."""

    def __init__(self, model_path: Path, meta: dict):
        super().__init__(meta)
        from .spm import load_spm_file

        self.proc = load_spm_file(model_path)
        self.offset = int(meta.get("offset", PEGASUS_OFFSET))
        self.reserved = {i: f"<unk_{i - 2}>" for i in range(4, self.offset)}
        self.reserved.update({0: "<pad>", 1: "</s>", 2: "<mask_1>", 3: "<mask_2>"})
        self.special_set = (
            set(range(self.offset))
            | {self._unk}
            | {self.offset + p for p in range(self.proc.GetPieceSize()) if self.proc.IsControl(p)}
        )

    def GetPieceSize(self) -> int:  # noqa: N802
        return int(self.meta.get("vocab_size", self.proc.GetPieceSize() + self.offset))

    def _encode(self, text: str) -> list[int]:
        return [p + self.offset for p in self.proc.EncodeAsIds(text)]

    def _decode(self, ids: list[int]) -> str:
        return self.proc.DecodeIds([i - self.offset for i in ids if i >= self.offset])

    def PieceToId(self, piece: str) -> int:  # noqa: N802
        for i, name in self.reserved.items():
            if name == piece:
                return i
        return self.proc.PieceToId(piece) + self.offset

    def IdToPiece(self, piece_id: int) -> str:  # noqa: N802
        if piece_id < self.offset:
            return self.reserved[piece_id]
        return self.proc.IdToPiece(piece_id - self.offset)


class ByteLevelBpe(_Adapter):
    """BART's byte-level BPE through Hugging Face's ``tokenizers``."""

    def __init__(self, path: Path, meta: dict):
        super().__init__(meta)
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception type; the message is one line
            raise DataError(f"{path}: not a tokenizers file ({str(err).splitlines()[0]})") from None
        self.special_set = {self._bos, self._pad, self._eos, self._unk} | set(meta.get("mask_ids", []))

    def GetPieceSize(self) -> int:  # noqa: N802
        return int(self.meta["vocab_size"])

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def PieceToId(self, piece: str) -> int:  # noqa: N802
        found = self.tok.token_to_id(piece)
        return self._unk if found is None else int(found)

    def IdToPiece(self, piece_id: int) -> str:  # noqa: N802
        return self.tok.id_to_token(int(piece_id)) or ""


def special_ids(proc) -> dict:
    """``{"bos", "pad", "eos", "unk"}`` of a tokenizer (ours: fairseq's 0 1 2 3)."""
    return {"bos": proc.bos_id(), "pad": proc.pad_id(), "eos": proc.eos_id(), "unk": proc.unk_id()}


def encode_source(proc, text: str) -> list[int]:
    """A document's ids without the final </s>: BART's sources start with <s> (as its tokenizer frames them)."""
    ids = list(proc.EncodeAsIds(text))
    return [proc.bos_id()] + ids if getattr(proc, "add_bos", False) else ids


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer of a data/export dir: our sentencepiece processor, or an imported one's adapter."""
    meta = tokenizer_meta(directory)
    main = tokenizer_files(directory)[0]
    if not main.is_file():
        raise DataError(f"{main}: no tokenizer (run pyramidion-preprocess or pyramidion-import first)")
    if meta is None:
        from .spm import load_spm_file

        return load_spm_file(main)
    return ByteLevelBpe(main, meta) if meta["family"] == "bart" else PegasusSpm(main, meta)


def check_tokenizer_ids(proc, where: str) -> None:
    """An imported tokenizer's special ids are its own (recorded in tokenizer.json): nothing to check
    beyond what loading did. Our own sentencepiece models must have fairseq's."""
    if isinstance(proc, _Adapter):
        return
    from .spm import check_special_ids

    check_special_ids(proc, where)


# ------------------------------------------------------------------------------------------------------
# from a Hugging Face model dir
# ------------------------------------------------------------------------------------------------------


def import_hf_tokenizer(family: str, hf_dir: Path, out_dir: Path, vocab_size: int) -> dict:
    """Write the tokenizer of the Hugging Face dir ``hf_dir`` into ``out_dir``; returns the special ids
    ``{"bos", "pad", "eos", "unk"}``. One-line error naming a missing file."""
    from ..errors import UsageError

    if family == "pegasus":
        src = hf_dir / "spiece.model"
        if not src.is_file():
            raise UsageError(f"'{hf_dir}' has no spiece.model (PEGASUS's sentencepiece tokenizer)")
        from .spm import load_spm_file

        proc = load_spm_file(src)
        if (proc.pad_id(), proc.eos_id(), proc.unk_id()) != (0, 1, 2):
            raise UsageError(
                f"'{src}': special ids pad={proc.pad_id()} eos={proc.eos_id()} unk={proc.unk_id()}, expected "
                f"PEGASUS's pad=0 eos=1 unk=2"
            )
        offset = _hf_tokenizer_config(hf_dir).get("offset", PEGASUS_OFFSET)
        special = {"bos": 0, "pad": 0, "eos": 1, "unk": proc.unk_id() + offset}
        shutil.copyfile(src, out_dir / SPM_FILE)
        meta = {"family": "pegasus", "offset": offset, "special_ids": special, "add_bos": False}
    else:
        special, meta = _import_bpe(hf_dir, out_dir)
    if vocab_size < meta.get("vocab_size", 0):
        raise UsageError(f"'{hf_dir}': the tokenizer has {meta['vocab_size']} ids, config.json vocab_size {vocab_size}")
    meta["vocab_size"] = int(vocab_size)  # the model's (it may have room for more ids than the tokenizer uses)
    (out_dir / TOKENIZER_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return special


def _hf_tokenizer_config(hf_dir: Path) -> dict:
    path = hf_dir / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _import_bpe(hf_dir: Path, out_dir: Path) -> tuple[dict, dict]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from ..errors import UsageError

    if (hf_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        missing = "vocab.json" if not (hf_dir / "vocab.json").is_file() else "merges.txt"
        raise UsageError(f"'{hf_dir}' has no tokenizer.json nor {missing} (BART's byte-level BPE)")
    tok.post_processor = None
    ids = {}
    for name, piece in (("bos", "<s>"), ("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>")):
        found = tok.token_to_id(piece)
        if found is None:
            raise UsageError(f"'{hf_dir}': the BPE vocabulary has no {piece}")
        ids[name] = int(found)
    mask = tok.token_to_id("<mask>")
    tok.save(str(out_dir / BPE_FILE))
    meta = {
        "family": "bart",
        "special_ids": ids,
        "add_bos": True,
        "mask_ids": [] if mask is None else [int(mask)],
        "vocab_size": int(tok.get_vocab_size(with_added_tokens=True)),
    }
    return ids, meta


def tokenizer_record(directory: str | os.PathLike) -> dict:
    """``{"spm_identity", "spm_sha256"}`` of a dir's vocabulary, as export.json and manifests record it."""
    from .spm import spm_identity, spm_sha256

    return {"spm_identity": spm_identity(directory), "spm_sha256": spm_sha256(directory)}
