"""Token-budget batches and a resumable sampler that shards them across ranks.

``make_batches`` sorts examples by *padded* source length (up to a multiple of ``pad_to_multiple``, e.g.
the encoder's chunk size; random order inside each padded length, new each epoch) and packs neighbours
greedily. A batch's cost is ``examples × padded longest source``, so sorting finer than the padding saves
nothing; it only makes batches alike. Exact-length sorting (fairseq's, source then target) put documents
with the same number of planted sentences and summary length together, and slowed a model's learning to
copy on the synthetic task by hundreds to thousands of updates (tools/experiments/pooling_learns/README.md,
finding 5). ``ShardedBatchSampler`` takes the epoch's batches, evens their number out to a multiple of the
micro-batches of one update over all ranks (world size x update_freq: by splitting the largest batches;
every example still appears exactly once) and deals them round-robin::

    epoch e batches   b0 b1 b2 b3 b4 b5 b6 b7      world_size 2, update_freq 2 (4 micro-batches per update)
    rank 0            b0    b2    b4    b6          position = batches this rank has handed out
    rank 1               b1    b3    b5    b7       global position = position x world size

The epoch's batch list depends on the micro-batches per update only, not on how they are spread over
ranks: a resume on another world size that keeps the global batch (world size x update_freq) continues
at the same global position with the next unseen batches, none repeated or skipped.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import DataError


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple if multiple and multiple > 0 else length


def bucket_batch_size(size: int, multiple: int) -> int:
    """The largest allowed batch size <= ``size``: a multiple of ``multiple``, or below it a power of two
    (``multiple`` 8: 1, 2, 4, 8, 16, 24, ...). ``multiple`` <= 1 allows every size."""
    if multiple <= 1 or size < 1:
        return size
    if size >= multiple:
        return size - size % multiple
    return 1 << (size.bit_length() - 1)


def make_batches(
    src_sizes: Sequence[int],
    max_tokens: Optional[int] = None,
    max_sentences: Optional[int] = None,
    pad_to_multiple: int = 0,
    seed: int = 0,
    epoch: int = 0,
    required_batch_size_multiple: int = 1,
) -> list[list[int]]:
    """Batches of example indices bucketed by padded source length, in a shuffled order fixed by
    ``(seed, epoch)``.

    With ``required_batch_size_multiple`` m > 1 (fairseq's flag) every batch holds a multiple of m
    examples, or below m a power of two (:func:`bucket_batch_size`): a full batch is cut down to that size
    and the examples cut off start the next batch, so the budget still holds and every example still
    appears once. Together with the padded source length this keeps a compiled model's input shapes to a
    small set.
    """
    if max_tokens is None and max_sentences is None:
        raise DataError("batching needs max_tokens or max_sentences (or both)")
    src = np.asarray(src_sizes, dtype=np.int64)
    rng = np.random.default_rng((seed, epoch))
    order = np.lexsort((rng.permutation(len(src)), padded_length(src, pad_to_multiple)))  # elementwise on arrays

    def over_budget(count: int, longest: int) -> bool:
        return (max_sentences is not None and count > max_sentences) or (
            max_tokens is not None and count * padded_length(longest, pad_to_multiple) > max_tokens
        )

    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order.tolist():
        size = int(src[index])
        if max_tokens is not None and padded_length(size, pad_to_multiple) > max_tokens:
            raise DataError(
                f"example {index} has {size} source tokens (padded "
                f"{padded_length(size, pad_to_multiple)}), more than max_tokens={max_tokens}; "
                f"raise max_tokens or lower max_source_positions"
            )
        while current and over_budget(len(current) + 1, max(longest, size)):
            keep = bucket_batch_size(len(current), required_batch_size_multiple)
            batches.append(current[:keep])
            current = current[keep:]
            longest = max((int(src[i]) for i in current), default=0)
        current.append(index)
        longest = max(longest, size)
    while current:
        keep = bucket_batch_size(len(current), required_batch_size_multiple)
        batches.append(current[:keep])
        current = current[keep:]
    return [batches[i] for i in rng.permutation(len(batches))]


def shape_bound(
    max_tokens: Optional[int],
    max_sentences: Optional[int],
    max_source_positions: int,
    pad_to_multiple: int,
    required_batch_size_multiple: int,
    max_target_positions: int,
    target_pad_to_multiple: int,
) -> int:
    """At most how many distinct (batch size, source width, target width) shapes bucketed batches take:
    for every padded source width, the allowed batch sizes that fit the budget, times the target widths.
    (Splitting batches to even out ranks, :func:`even_out`, adds up to world size x update_freq - 1 more per epoch.)"""
    pad_to_multiple, target_pad_to_multiple = max(pad_to_multiple, 1), max(target_pad_to_multiple, 1)
    target_widths = -(-max_target_positions // target_pad_to_multiple)
    total = 0
    for width in range(pad_to_multiple, padded_length(max_source_positions, pad_to_multiple) + 1, pad_to_multiple):
        largest = max_tokens // width if max_tokens else max_sentences
        if max_sentences:
            largest = min(largest, max_sentences)
        sizes = {bucket_batch_size(size, required_batch_size_multiple) for size in range(1, largest + 1)}
        total += len(sizes) * target_widths
    return total


def pad_target(batch: dict, multiple: int, pad_id: int) -> dict:
    """Pad a collated batch's ``target`` and ``prev_output_tokens`` (B×T) with ``pad_id`` up to a multiple
    of ``multiple`` positions (no-op for ``multiple`` <= 1). Padding targets count nowhere: the loss and
    ``ntokens`` skip ``pad_id``."""
    width = batch["target"].size(1)
    extra = padded_length(width, multiple) - width if multiple > 1 else 0
    if extra:
        import torch.nn.functional as F

        for key in ("target", "prev_output_tokens"):
            batch[key] = F.pad(batch[key], (0, extra), value=pad_id)
    return batch


def even_out(batches: list[list[int]], world_size: int) -> tuple[list[list[int]], int]:
    """Make ``len(batches)`` a multiple of ``world_size``: split the largest batches in two; only when no
    batch can be split (all single examples) repeat batches from the start. -> (batches, repeated)."""
    batches = [list(b) for b in batches]
    repeated = 0
    while batches and len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        batch = batches[largest]
        if len(batch) < 2:
            need = world_size - len(batches) % world_size
            repeated = need
            batches.extend(batches[:need] if need <= len(batches) else [batches[i % len(batches)] for i in range(need)])
            break
        half = len(batch) // 2
        batches[largest : largest + 1] = [batch[:half], batch[half:]]
    return batches, repeated


class ShardedBatchSampler:
    """Per epoch, this rank's disjoint, equal-count share of ``batches_fn(epoch)``; resumable.

    Use: ``sampler.set_epoch(e); for batch in sampler: ...``. ``state_dict()`` after a step records
    ``{"epoch", "position"}``; after ``load_state_dict`` (and ``set_epoch`` with the same epoch, which keeps
    the position) iteration yields exactly the batches not yet handed out. Behind a ``DataLoader`` with
    workers the loader prefetches ahead of training: then save the number of steps actually taken,
    ``state_dict(position=steps_taken_this_epoch)``.
    """

    def __init__(
        self,
        batches_fn: Callable[[int], list[list[int]]],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        update_freq: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise DataError(f"sampler: rank {rank} outside world size {world_size}")
        self.batches_fn, self.rank, self.world_size, self.seed = batches_fn, rank, world_size, seed
        self.per_update = world_size * max(1, update_freq)  #: micro-batches of one update, all ranks
        self.epoch, self.position = epoch, 0
        self.repeated = 0
        self._cache: Optional[tuple[int, list[list[int]]]] = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All of this rank's batches for ``epoch`` (the same on every call)."""
        if self._cache is None or self._cache[0] != epoch:
            batches, self.repeated = even_out(self.batches_fn(epoch), self.per_update)
            order = np.random.default_rng((self.seed, epoch, 1)).permutation(len(batches))
            batches = [batches[i] for i in order]
            self._cache = (epoch, batches[self.rank :: self.world_size])
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch

    def state_dict(self, position: Optional[int] = None) -> dict:
        """``position``: this rank's batches; ``global_position``: batches of the epoch handed out on all
        ranks, which a resume on another world size continues from."""
        position = self.position if position is None else int(position)
        return {
            "epoch": self.epoch,
            "position": position,
            "global_position": position * self.world_size,
            "micro_batches_per_update": self.per_update,
        }

    def load_state_dict(self, state: dict, world_size: Optional[int] = None) -> None:
        """Continue at a saved position. A state with ``global_position`` (or ``world_size``, the saving
        run's, for one without) continues on any world size whose share divides it."""
        self.epoch = int(state["epoch"])
        total = state.get("global_position")
        if total is None:
            total = int(state["position"]) * (world_size or self.world_size)
        if total % self.world_size:
            raise DataError(
                f"sampler: global position {total} of epoch {self.epoch} is not a multiple of the world size "
                f"{self.world_size}"
            )
        self.position = int(total) // self.world_size
