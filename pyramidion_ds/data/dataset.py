"""Torch datasets over the shards, and ``collate`` into the tensors the model takes.

    SummarizationDataset[i]  = {"id": i, "source": document ids + </s>, "target": summary ids + </s>}
    DenoisingDataset[i]      = {"id": i, "source": noise(document) + </s>, "target": document + </s>}
    GapSentencesDataset[i]   = {"id": i, "source": document, gaps masked + </s>, "target": gaps + </s>}
    SpanCorruptionDataset[i] = {"id": i, "source": document, spans -> sentinels + </s>,
                                "target": sentinel span ... + </s>}

Both truncate on read to the positions the model has (keeping the final ``</s>``) and expose
``src_sizes`` (for :func:`make_batches`) and ``tgt_sizes``. The shard readers are lazy memmaps, so a dataset
is cheap to pickle into ``DataLoader`` workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config.data import DenoisingConfig, GapSentencesConfig, SpanCorruptionConfig
from ..errors import DataError
from .binarize import read_meta
from .denoise import SENTINEL_FORMAT, add_noise, gap_sentences, sentence_end_table, span_corruption
from .indexed import ShardReader
from .spm import BOS_ID, EOS_ID, PAD_ID, load_spm, spm_sha256


def truncate(tokens: np.ndarray, limit: int, eos_id: int = EOS_ID) -> np.ndarray:
    """Keep at most ``limit`` tokens, the last of them ``</s>``."""
    if len(tokens) <= limit:
        return tokens
    out = tokens[:limit].copy()
    out[-1] = eos_id
    return out


def open_shard(data_dir: str | os.PathLike, split: str, side: str) -> ShardReader:
    """A checked reader of ``<data_dir>/<split>.<side>``: split and side must exist, its header's spm
    hash must match the ``spm.model`` in ``data_dir``."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} (splits: {', '.join(meta['splits'])})")
    if side not in meta["splits"][split]["sides"]:
        raise DataError(f"{data_dir}: split {split!r} has no {side} side (unlabeled data? use the denoising task)")
    sha = spm_sha256(data_dir)
    if meta["spm_sha256"] != sha:
        raise DataError(
            f"{Path(data_dir) / 'meta.json'}: built with spm model {meta['spm_sha256'][:12]}, but "
            f"spm.model is {sha[:12]}; re-run pyramidion-preprocess"
        )
    reader = ShardReader(Path(data_dir) / f"{split}.{side}", expected_sha256=sha)
    reader.header  # noqa: B018 (a property that validates): a mismatch should fail at startup, not in a worker
    return reader


class _ShardDataset(torch.utils.data.Dataset):
    def __init__(self, data_dir, split: str, max_source_positions: int, max_target_positions: int):
        if max_source_positions < 2 or max_target_positions < 2:
            raise DataError(
                f"max positions must be >= 2 (one token and </s>), got {max_source_positions}/{max_target_positions}"
            )
        self.data_dir, self.split = str(data_dir), split
        self.max_source_positions, self.max_target_positions = max_source_positions, max_target_positions
        self.source = open_shard(data_dir, split, "source")
        self.eos_id = int(read_meta(data_dir).get("special_ids", {}).get("eos", EOS_ID))  # an import's own
        self.indices = np.arange(len(self.source))
        self._ids: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.indices)

    def example_id(self, i: int) -> str:
        """The original id (from the input data) of dataset example ``i``."""
        if self._ids is None:
            self._ids = json.loads((Path(self.data_dir) / f"{self.split}.ids.json").read_text(encoding="utf-8"))
        return self._ids[int(self.indices[i])]


class SummarizationDataset(_ShardDataset):
    """Document -> summary pairs. ``truncate=False`` leaves out (and counts in ``num_dropped``) sources
    longer than ``max_source_positions`` instead of cutting them; targets are always cut."""

    def __init__(
        self, data_dir, split: str, max_source_positions: int, max_target_positions: int, truncate: bool = True
    ):
        super().__init__(data_dir, split, max_source_positions, max_target_positions)
        self.target = open_shard(data_dir, split, "target")
        src, tgt = self.source.sizes, self.target.sizes
        if len(src) != len(tgt):
            raise DataError(f"{data_dir}: {split} has {len(src)} sources but {len(tgt)} targets")
        self.num_dropped = 0
        if not truncate:
            self.indices = np.flatnonzero(src <= max_source_positions)
            self.num_dropped = len(src) - len(self.indices)
        self.src_sizes = np.minimum(src[self.indices], max_source_positions)
        self.tgt_sizes = np.minimum(tgt[self.indices], max_target_positions)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        return {
            "id": i,
            "source": torch.from_numpy(truncate(self.source[j], self.max_source_positions, self.eos_id)),
            "target": torch.from_numpy(truncate(self.target[j], self.max_target_positions, self.eos_id)),
        }


class _PretrainingDataset(_ShardDataset):
    """Unlabeled documents for pretraining: (source, target) made from the document by an objective.

    The objective is a pure function of ``(seed, epoch, index)``; call :meth:`set_epoch` before each epoch
    (before the ``DataLoader`` iterator is created, so workers get the new epoch). The document is first
    cut to the encoder's positions; ``src_sizes`` are upper bounds (no objective lengthens a source).
    """

    def __init__(self, data_dir, split: str, max_source_positions: int, max_target_positions: int, seed: int = 0):
        super().__init__(data_dir, split, max_source_positions, max_target_positions)
        self.seed, self.epoch = seed, 0
        # the vocabulary is read here only (not kept: the dataset is pickled into DataLoader workers)
        proc = load_spm(data_dir)
        self.sentence_end = sentence_end_table(proc)
        self.src_sizes = np.minimum(self.source.sizes, max_source_positions)
        self.read_vocabulary(proc)

    def read_vocabulary(self, proc) -> None:
        """Take the ids of the pieces the objective needs from the sentencepiece model."""

    def piece_id(self, proc, piece: str, key: str) -> int:
        """The id of a user-defined piece the objective needs; one line naming ``key`` when missing."""
        piece_id = int(proc.PieceToId(piece))
        if piece_id == proc.unk_id():
            raise DataError(
                f"{self.data_dir}/spm.model: no piece for {key} {piece!r} (re-run "
                f"pyramidion-preprocess with --spm-user-symbols including it)"
            )
        return piece_id

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def make_pair(
        self, body: np.ndarray, document: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) without their ``</s>``; ``body`` is the truncated document without ``</s>``."""
        raise NotImplementedError

    def noised(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        document = self.source[int(self.indices[i])]
        body = truncate(document, self.max_source_positions, self.eos_id)[:-1]
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        source, target = self.make_pair(body, document, rng)
        source = np.append(source[: len(body)], self.eos_id).astype(np.int64)  # BART's infilling may insert
        target = np.append(target[: self.max_target_positions - 1], self.eos_id).astype(np.int64)
        return source, target

    def __getitem__(self, i: int) -> dict:
        source, target = self.noised(i)
        return {"id": i, "source": torch.from_numpy(source), "target": torch.from_numpy(target)}


class DenoisingDataset(_PretrainingDataset):
    """BART: source = the document with sentences permuted and spans infilled, target = the document
    (its first ``max_target_positions`` tokens: on long documents most of the text is never a target)."""

    def __init__(
        self,
        data_dir,
        split: str,
        max_source_positions: int,
        max_target_positions: int,
        cfg: DenoisingConfig | None = None,
        seed: int = 0,
    ):
        self.cfg = cfg or DenoisingConfig()
        super().__init__(data_dir, split, max_source_positions, max_target_positions, seed)
        self.tgt_sizes = np.minimum(self.source.sizes, max_target_positions)

    def make_pair(self, body, document, rng):
        noised = add_noise(
            body,
            mask_id=self.mask_id,
            sentence_end=self.sentence_end,
            mask_ratio=self.cfg.mask_ratio,
            poisson_lambda=self.cfg.poisson_lambda,
            permute_ratio=self.cfg.permute_sentences,
            rng=rng,
        )
        return noised, document[:-1]

    def read_vocabulary(self, proc) -> None:
        self.mask_id = self.piece_id(proc, self.cfg.mask_token, "data.denoising.mask_token")


class GapSentencesDataset(_PretrainingDataset):
    """PEGASUS: the most representative sentences of the (encoder-length) document, each masked by one
    token in the source, are the target, in document order (:func:`~.denoise.gap_sentences`)."""

    def __init__(
        self,
        data_dir,
        split: str,
        max_source_positions: int,
        max_target_positions: int,
        cfg: GapSentencesConfig | None = None,
        seed: int = 0,
    ):
        self.cfg = cfg or GapSentencesConfig()
        super().__init__(data_dir, split, max_source_positions, max_target_positions, seed)
        self.tgt_sizes = np.minimum(self.src_sizes, max_target_positions)

    def make_pair(self, body, document, rng):
        source, target, _ = gap_sentences(
            body,
            sentence_end=self.sentence_end,
            mask_id=self.mask_id,
            ratio=self.cfg.ratio,
            score_noise=self.cfg.score_noise,
            max_target_tokens=self.max_target_positions - 1,
            rng=rng,
        )
        return source, target

    def read_vocabulary(self, proc) -> None:
        self.mask_id = self.piece_id(proc, self.cfg.mask_token, "data.gap_sentences.mask_token")


def sentinel_ids(proc, limit: int) -> np.ndarray:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... as far as the vocabulary has them (at most ``limit``)."""
    ids = []
    for k in range(limit):
        piece_id = int(proc.PieceToId(SENTINEL_FORMAT.format(k)))
        if piece_id == proc.unk_id():
            break
        ids.append(piece_id)
    return np.array(ids, dtype=np.int64)


class SpanCorruptionDataset(_PretrainingDataset):
    """T5: random spans of the (encoder-length) document become sentinels in the source; the target
    lists each sentinel and its span (:func:`~.denoise.span_corruption`)."""

    def __init__(
        self,
        data_dir,
        split: str,
        max_source_positions: int,
        max_target_positions: int,
        cfg: SpanCorruptionConfig | None = None,
        seed: int = 0,
    ):
        self.cfg = cfg or SpanCorruptionConfig()
        super().__init__(data_dir, split, max_source_positions, max_target_positions, seed)
        self.tgt_sizes = np.minimum(self.src_sizes, max_target_positions)

    def read_vocabulary(self, proc) -> None:
        self.sentinel_ids = sentinel_ids(proc, self.cfg.max_sentinels)
        if len(self.sentinel_ids) == 0:
            raise DataError(
                f"{self.data_dir}/spm.model: no sentinel pieces ({SENTINEL_FORMAT.format(0)}, ...) "
                f"for data.task span_corruption; re-run pyramidion-preprocess with --spm-sentinels "
                f"{self.cfg.max_sentinels}"
            )

    def make_pair(self, body, document, rng):
        return span_corruption(
            body,
            sentinel_ids=self.sentinel_ids,
            noise_density=self.cfg.noise_density,
            mean_span=self.cfg.mean_noise_span_length,
            max_target_tokens=self.max_target_positions - 1,
            rng=rng,
        )


def pretraining_dataset(
    task: str, data_dir, split: str, max_source_positions: int, max_target_positions: int, data_cfg, seed: int = 0
) -> _PretrainingDataset:
    """The dataset of pretraining objective ``task`` (``data.task``), with its config section."""
    if task == "denoising":
        return DenoisingDataset(data_dir, split, max_source_positions, max_target_positions, data_cfg.denoising, seed)
    if task == "gap_sentences":
        return GapSentencesDataset(
            data_dir, split, max_source_positions, max_target_positions, data_cfg.gap_sentences, seed
        )
    if task == "span_corruption":
        return SpanCorruptionDataset(
            data_dir, split, max_source_positions, max_target_positions, data_cfg.span_corruption, seed
        )
    raise DataError(f"data.task: {task!r} is not a pretraining objective (denoising, gap_sentences, span_corruption)")


def collate(
    samples: list[dict], pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_to_multiple: int = 0
) -> dict:
    """Right-padded batch tensors (fairseq layout)::

    src_tokens          B×S  documents, S = longest (rounded up to pad_to_multiple when > 0)
    src_lengths         B
    prev_output_tokens  B×T  <s> + target[:-1]   (teacher forcing, shifted right)
    target              B×T  target, padded
    ids                 B    dataset indices;  ntokens: non-pad target tokens
    """
    if not samples:
        return {
            "ids": torch.zeros(0, dtype=torch.long),
            "src_tokens": torch.zeros(0, 0, dtype=torch.long),
            "src_lengths": torch.zeros(0, dtype=torch.long),
            "prev_output_tokens": torch.zeros(0, 0, dtype=torch.long),
            "target": torch.zeros(0, 0, dtype=torch.long),
            "ntokens": 0,
        }
    batch = len(samples)
    src_lengths = torch.tensor([len(s["source"]) for s in samples], dtype=torch.long)
    tgt_lengths = [len(s["target"]) for s in samples]
    src_width = int(src_lengths.max())
    if pad_to_multiple and pad_to_multiple > 0:
        src_width = -(-src_width // pad_to_multiple) * pad_to_multiple
    tgt_width = max(tgt_lengths)
    src_tokens = torch.full((batch, src_width), pad_id, dtype=torch.long)
    target = torch.full((batch, tgt_width), pad_id, dtype=torch.long)
    prev_output_tokens = torch.full((batch, tgt_width), pad_id, dtype=torch.long)
    for row, sample in enumerate(samples):
        source, tgt = sample["source"], sample["target"]
        src_tokens[row, : len(source)] = source
        target[row, : len(tgt)] = tgt
        prev_output_tokens[row, 0] = bos_id
        prev_output_tokens[row, 1 : len(tgt)] = tgt[:-1]
    return {
        "ids": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "src_tokens": src_tokens,
        "src_lengths": src_lengths,
        "prev_output_tokens": prev_output_tokens,
        "target": target,
        "ntokens": int(sum(tgt_lengths)),
    }
