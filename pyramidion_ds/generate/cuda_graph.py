"""Decoding steps replayed from a CUDA graph: one launch per step instead of a few hundred.

A generation step of the ``base`` model is ~250 small kernels (R = batch·beam rows, one position); on an
H100 the GPU finishes them faster than Python can launch them, so the step is host-bound. With a
:class:`~pyramidion_ds.model.StaticDecoderCache` the step (``PyramidionModel.static_step``: beam reorder,
embedding, every decoder layer, output projection) is the same fixed kernel sequence every time, so it is
captured once and replayed::

    step 0   eager, on a side stream (warms up cuBLAS and the allocator; the step's real work)
    step 1   capture (records, runs nothing) + replay
    step 2.. copy the new tokens into the graph's input, replay

A cache whose buffers change (finished sources dropped: ``cache.version`` moves) is captured again.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..model import StaticDecoderCache


class GraphedDecodeStep:
    """Drop-in for ``model.decode_step`` with a :class:`StaticDecoderCache` on CUDA."""

    def __init__(self, model):
        self.model = model
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.key: Optional[tuple[int, int]] = None  #: (cache.version, source mask address) captured
        self.captures = 0
        self._tokens: Optional[Tensor] = None
        self._logits: Optional[Tensor] = None
        self._warm = False

    def __call__(self, prev_tokens: Tensor, encoder_out, cache: StaticDecoderCache) -> Tensor:
        new_tokens = prev_tokens[:, cache.length :]
        if not self._warm:
            logits = self._eager_on_side_stream(new_tokens, encoder_out.mask, cache)
            self._warm = True
        else:
            if self.graph is None or self.key != (cache.version, encoder_out.mask.data_ptr()):
                self._capture(new_tokens, encoder_out.mask, cache)
            else:
                self._tokens.copy_(new_tokens)
            self.graph.replay()
            logits = self._logits.clone()  # the graph's output is overwritten by the next replay
        cache.length += 1
        return logits

    def _eager_on_side_stream(self, tokens: Tensor, source_mask: Tensor, cache: StaticDecoderCache) -> Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self.model.static_step(tokens, source_mask, cache)
        torch.cuda.current_stream().wait_stream(stream)
        return logits

    def _capture(self, tokens: Tensor, source_mask: Tensor, cache: StaticDecoderCache) -> None:
        self.graph = None  # release the previous graph (and its memory pool) first
        self._tokens = tokens.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self.model.static_step(self._tokens, source_mask, cache)
        self.graph, self.key = graph, (cache.version, source_mask.data_ptr())
        self.captures += 1
