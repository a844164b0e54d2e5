"""Sentencepiece: train one joined vocabulary (fairseq's special ids) or reuse a given model.

Special ids follow fairseq's dictionary order, which the model and the trainer rely on::

    <s> = 0 (bos)   <pad> = 1   </s> = 2 (eos)   <unk> = 3   then user symbols (<mask>, ...)

Sentencepiece skips training "sentences" longer than ``max_sentence_length`` bytes, and our documents
are tens of thousands of characters, so training text is cut into pieces of at most
:data:`TRAIN_PIECE_CHARS` characters at whitespace first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from ..errors import DataError

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_IDS = {"bos": BOS_ID, "pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}
SPM_MODEL = "spm.model"
SPM_VOCAB = "spm.vocab"
TRAIN_PIECE_CHARS = 2000


def _imported_dir(path: Path) -> Path | None:
    """The dir of an imported tokenizer (data/tokenizer.py) that ``path`` (a dir, or its ``spm.model``
    path) names; None for our own sentencepiece vocabulary."""
    from .tokenizer import imported_tokenizer_dir

    return imported_tokenizer_dir(path)


def _model_path(data_dir_or_model: str | os.PathLike) -> Path:
    path = Path(data_dir_or_model)
    imported = _imported_dir(path)
    if imported is not None:
        from .tokenizer import tokenizer_files

        path = tokenizer_files(imported)[0]
    elif path.is_dir():
        path = path / SPM_MODEL
    if not path.is_file():
        raise DataError(f"{path}: no sentencepiece model (run pyramidion-preprocess first)")
    return path


def load_spm(data_dir: str | os.PathLike):
    """The :class:`sentencepiece.SentencePieceProcessor` of a data dir (or of a ``.model`` path); for an
    imported tokenizer (PEGASUS, BART) its adapter with the same methods (data/tokenizer.py)."""
    imported = _imported_dir(Path(data_dir))
    if imported is not None:
        from .tokenizer import load_tokenizer

        return load_tokenizer(imported)
    return load_spm_file(_model_path(data_dir))


def load_spm_file(path: str | os.PathLike):
    """The :class:`sentencepiece.SentencePieceProcessor` of a ``.model`` file."""
    import sentencepiece as spm

    path = Path(path)
    proc = spm.SentencePieceProcessor()
    try:
        proc.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise DataError(f"{path}: not a sentencepiece model ({str(err).splitlines()[0]})") from None
    return proc


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def spm_sha256(data_dir: str | os.PathLike) -> str:
    """sha256 of the sentencepiece model file; shard headers record it to catch a swapped vocabulary.
    An imported tokenizer: of its file and its tokenizer.json (special ids) together."""
    imported = _imported_dir(Path(data_dir))
    if imported is None:
        return file_sha256(_model_path(data_dir))
    from .tokenizer import tokenizer_files

    digest = hashlib.sha256()
    for path in tokenizer_files(imported):
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


#: trainer fields that change how text is encoded or decoded (the rest only steer training: the path of
#: the training text, sample sizes, thread counts, ... and differ between two trainings of one vocabulary)
_ENCODING_TRAINER_FIELDS = (
    "model_type",
    "byte_fallback",
    "treat_whitespace_as_suffix",
    "allow_whitespace_only_pieces",
    "unk_surface",
    "unk_id",
    "bos_id",
    "eos_id",
    "pad_id",
)
_NORMALIZER_FIELDS = (
    "name",
    "precompiled_charsmap",
    "add_dummy_prefix",
    "remove_extra_whitespaces",
    "escape_whitespaces",
    "normalization_rule_tsv",
)


def spm_identity(data_dir_or_model: str | os.PathLike) -> str:
    """What a vocabulary *is*: sha256 over its pieces (text, score, type), its normalizer and
    denormalizer, and the trainer fields that change encoding.

    Unlike :func:`spm_sha256` of the file, it leaves out what the serialized model also records about
    its training (the temporary path of the training text, sentence counts), so retraining on the same
    text gives the same identity and a rerun of the quick start can resume.
    """
    from sentencepiece import sentencepiece_model_pb2

    path = _model_path(data_dir_or_model)
    imported = _imported_dir(Path(data_dir_or_model))
    if imported is not None and path.name != SPM_MODEL:  # BART's BPE: its files are what it is
        return hashlib.sha256(b"pyramidion-tokenizer-identity-1\0" + spm_sha256(imported).encode()).hexdigest()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf's DecodeError; the message is one line
        raise DataError(
            f"{path}: not a sentencepiece model ({str(err).splitlines()[0] if str(err) else err})"
        ) from None
    if not proto.pieces:
        raise DataError(f"{path}: not a sentencepiece model (no pieces)")
    digest = hashlib.sha256(b"pyramidion-spm-identity-1\0")

    def add(value) -> None:
        data = value if isinstance(value, bytes) else repr(value).encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for piece in proto.pieces:
        add(piece.piece)
        add(float(piece.score).hex())
        add(int(piece.type))
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        for name in _NORMALIZER_FIELDS:
            add(getattr(spec, name))
    for name in _ENCODING_TRAINER_FIELDS:
        add(getattr(proto.trainer_spec, name))
    if imported is not None:  # PEGASUS: the offset and special ids are part of the vocabulary
        from .tokenizer import TOKENIZER_META

        add((imported / TOKENIZER_META).read_bytes())
    return digest.hexdigest()


def same_vocabulary(
    recorded: dict, current_identity: str, current_sha256: str, recorded_model: str | os.PathLike | None = None
) -> bool | None:
    """Whether a vocabulary recorded as ``{"spm_identity", "spm_sha256"}`` (a checkpoint manifest, an
    export's ``export.json``) is the current one.

    Records written before identities existed hold the file's sha256 only: equal files agree; otherwise
    ``recorded_model`` (the run dir's own ``spm.model``) settles it when it is still the very file that
    was recorded. None when nothing was recorded (nothing to compare).
    """
    if recorded.get("spm_identity"):
        return recorded["spm_identity"] == current_identity
    sha = recorded.get("spm_sha256")
    if not sha:
        return None
    if sha == current_sha256:
        return True
    if recorded_model is not None and Path(recorded_model).is_file() and file_sha256(recorded_model) == sha:
        return spm_identity(recorded_model) == current_identity
    return False


def _utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 sequence this byte starts (0: a continuation byte or never valid)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _valid_byte_pieces(run: list[tuple[int, int]]) -> list[int]:
    """The ids of a run of byte pieces ``(id, byte)`` that form complete UTF-8 sequences, in order."""
    kept, i = [], 0
    while i < len(run):
        length = _utf8_length(run[i][1])
        chunk = run[i : i + length]
        if length and len(chunk) == length:
            try:
                bytes(b for _, b in chunk).decode("utf-8")
                kept.extend(piece_id for piece_id, _ in chunk)
                i += length
                continue
            except UnicodeDecodeError:
                pass
        i += 1  # a byte no sequence can use: dropped
    return kept


def decode_text(proc, ids: Iterable[int]) -> str:
    """Generated ids -> text. With byte fallback a model can emit byte pieces that do not form a character
    (a lead byte without its continuation, a stray continuation byte); sentencepiece shows each as U+FFFD.
    Those bytes are dropped instead, so a summary holds only characters the pieces spell."""
    ids = [int(i) for i in ids]
    text = proc.DecodeIds(ids)
    if "\ufffd" not in text:
        return text
    kept, run = [], []
    for piece_id in ids + [-1]:  # -1: flushes the last run
        if piece_id >= 0 and proc.IsByte(piece_id):
            run.append((piece_id, int(proc.IdToPiece(piece_id)[1:-1], 16)))  # "<0xE2>" -> 0xE2
            continue
        kept.extend(_valid_byte_pieces(run))
        run = []
        if piece_id >= 0:
            kept.append(piece_id)
    return proc.DecodeIds(kept)


def vocab_size(data_dir: str | os.PathLike) -> int:
    return int(load_spm(data_dir).GetPieceSize())


def check_special_ids(proc, where: str, user_symbols: Iterable[str] = ()) -> None:
    """Fail in one line when a reused model does not have fairseq's special ids (or a needed symbol)."""
    expected = {
        "bos": (proc.bos_id(), BOS_ID),
        "pad": (proc.pad_id(), PAD_ID),
        "eos": (proc.eos_id(), EOS_ID),
        "unk": (proc.unk_id(), UNK_ID),
    }
    wrong = [f"{name}={got} (expected {want})" for name, (got, want) in expected.items() if got != want]
    if wrong:
        raise DataError(
            f"{where}: special ids {', '.join(wrong)}; train it with bos_id=0 pad_id=1 "
            f"eos_id=2 unk_id=3 or let pyramidion-preprocess train one"
        )
    for symbol in user_symbols:
        if proc.PieceToId(symbol) == proc.unk_id():
            raise DataError(f"{where}: has no piece for user symbol '{symbol}'")


def training_pieces(text: str, max_chars: int = TRAIN_PIECE_CHARS) -> Iterable[str]:
    """Lines of ``text`` cut at whitespace into pieces of at most ``max_chars`` characters."""
    for line in text.splitlines():
        line = line.strip()
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            yield line[:cut]
            line = line[cut:].lstrip()
        if line:
            yield line


def train_spm(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 32000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    sample_size: int = 2_000_000,
    user_symbols: Iterable[str] = ("<mask>",),
    byte_fallback: Optional[bool] = None,
    num_threads: int = 1,
) -> Path:
    """Train ``out_dir/spm.model`` (+ ``spm.vocab``) on ``texts`` (documents and summaries).

    ``sample_size`` is the number of training pieces sentencepiece samples (``input_sentence_size``).
    ``byte_fallback``: characters the vocabulary lacks are spelled as UTF-8 byte pieces, so any text
    round-trips (no ``⁇``); it takes 256 pieces. None (the default): on, unless the vocabulary is too
    small to hold the byte pieces and the characters it needs (then off, with a warning); True: on, and
    a vocabulary too small is an error; False: off.
    The model appears complete or not at all: it is trained under a temporary prefix, then renamed.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    user_symbols = [s for s in user_symbols if s]
    with tempfile.TemporaryDirectory(dir=out, prefix=".spm-") as tmp:
        text_path = Path(tmp) / "train.txt"
        lines = 0
        with open(text_path, "w", encoding="utf-8") as fh:
            for text in texts:
                for piece in training_pieces(text):
                    fh.write(re.sub(r"\s+", " ", piece) + "\n")
                    lines += 1
        if lines == 0:
            raise DataError("no training text for sentencepiece (every document and summary is empty)")
        prefix = Path(tmp) / "spm"

        def train(with_bytes: bool) -> None:
            spm.SentencePieceTrainer.Train(
                input=str(text_path),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=sample_size,
                shuffle_input_sentence=True,
                bos_id=BOS_ID,
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                byte_fallback=with_bytes,
                user_defined_symbols=user_symbols,
                max_sentence_length=4 * TRAIN_PIECE_CHARS + 64,
                num_threads=max(1, num_threads),
                minloglevel=2,
            )

        try:
            try:
                train(byte_fallback is not False)
            except RuntimeError as err:
                # "Vocabulary size is smaller than required_chars. 256 vs 310.": no room for the byte pieces
                if byte_fallback is not None or "required_chars" not in str(err):
                    raise
                needed = re.search(r"\d+ vs (\d+)", str(err))
                logging.getLogger(__name__).warning(
                    f"sentencepiece: a vocabulary of {vocab_size} has no room for byte fallback's 256 byte "
                    f"pieces{f' (it would need {needed.group(1)})' if needed else ''}; trained without it, so "
                    f"characters outside the vocabulary become <unk>. Raise --spm-vocab-size, or pass "
                    f"--no-spm-byte-fallback to silence this"
                )
                train(False)
        except RuntimeError as err:
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            hint = "; lower --spm-vocab-size" if "vocab" in message.lower() and "Please set" not in message else ""
            if byte_fallback and "required_chars" in message:
                hint = "; byte fallback takes 256 pieces: raise --spm-vocab-size or pass --no-spm-byte-fallback"
            raise DataError(f"sentencepiece training failed: {message}{hint}") from None
        os.replace(f"{prefix}.vocab", out / SPM_VOCAB)
        os.replace(f"{prefix}.model", out / SPM_MODEL)
    return out / SPM_MODEL
