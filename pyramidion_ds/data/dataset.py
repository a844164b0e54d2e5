"""Torch datasets over the shards, and ``collate`` into the tensors the model takes.

    SummarizationDataset[i] = {"id": i, "source": document ids + </s>, "target": summary ids + </s>}
    DenoisingDataset[i]     = {"id": i, "source": noise(document) + </s>, "target": document + </s>}

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

from ..config.data import DenoisingConfig
from .binarize import read_meta
from .denoise import add_noise, sentence_end_table
from .errors import DataError
from .indexed import ShardReader
from .spm import BOS_ID, EOS_ID, PAD_ID, load_spm, spm_sha256


def truncate(tokens: np.ndarray, limit: int) -> np.ndarray:
    """Keep at most ``limit`` tokens, the last of them ``</s>``."""
    if len(tokens) <= limit:
        return tokens
    out = tokens[:limit].copy()
    out[-1] = EOS_ID
    return out


def open_shard(data_dir: str | os.PathLike, split: str, side: str) -> ShardReader:
    """A checked reader of ``<data_dir>/<split>.<side>``: split and side must exist, its header's spm
    hash must match the ``spm.model`` in ``data_dir``."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} (splits: {', '.join(meta['splits'])})")
    if side not in meta["splits"][split]["sides"]:
        raise DataError(f"{data_dir}: split {split!r} has no {side} side (unlabeled data? use the "
                        f"denoising task)")
    sha = spm_sha256(data_dir)
    if meta["spm_sha256"] != sha:
        raise DataError(f"{Path(data_dir) / 'meta.json'}: built with spm model {meta['spm_sha256'][:12]}, but "
                        f"spm.model is {sha[:12]}; re-run pyramidion-preprocess")
    reader = ShardReader(Path(data_dir) / f"{split}.{side}", expected_sha256=sha)
    reader.header  # validate now: a mismatch should fail at startup, not in a worker
    return reader


class _ShardDataset(torch.utils.data.Dataset):
    def __init__(self, data_dir, split: str, max_source_positions: int, max_target_positions: int):
        if max_source_positions < 2 or max_target_positions < 2:
            raise DataError(f"max positions must be >= 2 (one token and </s>), got "
                            f"{max_source_positions}/{max_target_positions}")
        self.data_dir, self.split = str(data_dir), split
        self.max_source_positions, self.max_target_positions = max_source_positions, max_target_positions
        self.source = open_shard(data_dir, split, "source")
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

    def __init__(self, data_dir, split: str, max_source_positions: int, max_target_positions: int,
                 truncate: bool = True):
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
        return {"id": i,
                "source": torch.from_numpy(truncate(self.source[j], self.max_source_positions)),
                "target": torch.from_numpy(truncate(self.target[j], self.max_target_positions))}


class DenoisingDataset(_ShardDataset):
    """Unlabeled documents for pretraining: source = noised document, target = the document.

    Noise is a pure function of ``(seed, epoch, index)``; call :meth:`set_epoch` before each epoch (before
    the ``DataLoader`` iterator is created, so workers get the new epoch). ``src_sizes`` are upper bounds:
    a noised source is never longer than the (truncated) document.
    """

    def __init__(self, data_dir, split: str, max_source_positions: int, max_target_positions: int,
                 cfg: DenoisingConfig | None = None, seed: int = 0):
        super().__init__(data_dir, split, max_source_positions, max_target_positions)
        self.cfg = cfg or DenoisingConfig()
        self.seed, self.epoch = seed, 0
        proc = load_spm(data_dir)
        self.mask_id = int(proc.PieceToId(self.cfg.mask_token))
        if self.mask_id == proc.unk_id():
            raise DataError(f"{data_dir}/spm.model: no piece for mask token {self.cfg.mask_token!r} "
                            f"(add it with --spm-user-symbols)")
        self.sentence_end = sentence_end_table(proc)
        sizes = self.source.sizes
        self.src_sizes = np.minimum(sizes, max_source_positions)
        self.tgt_sizes = np.minimum(sizes, max_target_positions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def noised(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        document = self.source[int(self.indices[i])]
        source = truncate(document, self.max_source_positions)
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        body = add_noise(source[:-1], mask_id=self.mask_id, sentence_end=self.sentence_end,
                         mask_ratio=self.cfg.mask_ratio, poisson_lambda=self.cfg.poisson_lambda,
                         permute_ratio=self.cfg.permute_sentences, rng=rng)
        noised = np.append(body[:len(source) - 1], EOS_ID).astype(np.int64)
        return noised, truncate(document, self.max_target_positions)

    def __getitem__(self, i: int) -> dict:
        source, target = self.noised(i)
        return {"id": i, "source": torch.from_numpy(source), "target": torch.from_numpy(target)}


def collate(samples: list[dict], pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
            pad_to_multiple: int = 0) -> dict:
    """Right-padded batch tensors (fairseq layout)::

        src_tokens          B×S  documents, S = longest (rounded up to pad_to_multiple when > 0)
        src_lengths         B
        prev_output_tokens  B×T  <s> + target[:-1]   (teacher forcing, shifted right)
        target              B×T  target, padded
        ids                 B    dataset indices;  ntokens: non-pad target tokens
    """
    if not samples:
        return {"ids": torch.zeros(0, dtype=torch.long), "src_tokens": torch.zeros(0, 0, dtype=torch.long),
                "src_lengths": torch.zeros(0, dtype=torch.long),
                "prev_output_tokens": torch.zeros(0, 0, dtype=torch.long),
                "target": torch.zeros(0, 0, dtype=torch.long), "ntokens": 0}
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
        src_tokens[row, :len(source)] = source
        target[row, :len(tgt)] = tgt
        prev_output_tokens[row, 0] = bos_id
        prev_output_tokens[row, 1:len(tgt)] = tgt[:-1]
    return {"ids": torch.tensor([s["id"] for s in samples], dtype=torch.long), "src_tokens": src_tokens,
            "src_lengths": src_lengths, "prev_output_tokens": prev_output_tokens, "target": target,
            "ntokens": int(sum(tgt_lengths))}
