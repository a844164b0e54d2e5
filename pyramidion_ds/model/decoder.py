"""The decoder: causal self-attention with an incremental KV cache, cross-attention over the pooled encoder.

The beam cache::

    DecoderCache
      self_kv[layer]   (B·beam)×H×t×dh   grows by one position per step; reorder_cache picks rows
      source_kv[layer] B×H×k×dh          computed on the first step from EncoderOut, one row per source,
                                         shared by that source's beams (rows b·beam .. b·beam+beam-1)

The static cache (:class:`StaticDecoderCache`, for CUDA-graph decoding) holds the same things in
buffers allocated once for the longest output: self_kv[layer] is (B·beam)×H×T×dh written at a position
tensor, and a beam reorder is only recorded (``order``) and applied at the start of the next step, so
every step is the same fixed sequence of kernels with no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import KeyValue, StaticKeyValue
from .encoder import EncoderOut
from .layers import DecoderLayer, PositionEmbedding


@dataclass
class DecoderCache:
    self_kv: list[Optional[KeyValue]] = field(default_factory=list)
    source_kv: Optional[list[KeyValue]] = None
    length: int = 0  #: positions already decoded

    def reorder(self, new_order: Tensor) -> None:
        """Keep decoder rows ``new_order`` (beam search: each new row comes from a beam of the same source)."""
        self.self_kv = [
            None if kv is None else (kv[0].index_select(0, new_order), kv[1].index_select(0, new_order))
            for kv in self.self_kv
        ]

    def select_sources(self, source_order: Tensor) -> None:
        """Keep sources ``source_order`` in the shared cross-attention K/V (drop finished sources)."""
        if self.source_kv is not None:
            self.source_kv = [
                (k.index_select(0, source_order), v.index_select(0, source_order)) for k, v in self.source_kv
            ]


class StaticDecoderCache(DecoderCache):
    """Fixed-shape cache (build it with :meth:`Decoder.new_static_cache`); decode with one position a step.

    ``reorder`` of the same number of rows only records the order (applied inside the next step); fewer
    rows (finished sources dropped) reallocate the buffers and bump ``version``, as does
    ``select_sources``: a captured CUDA graph is valid for one ``version``.
    """

    def __init__(self, self_kv: list[StaticKeyValue], source_kv: list[KeyValue]):
        super().__init__(self_kv=self_kv, source_kv=source_kv)
        rows, device = self_kv[0].key.size(0), self_kv[0].key.device
        self.position = self_kv[0].position
        self.identity = torch.arange(rows, device=device)
        self.order = self.identity.clone()  #: new row i = current row order[i], applied by the next step
        self.version = 0

    @property
    def rows(self) -> int:
        return self.identity.numel()

    def reorder(self, new_order: Tensor) -> None:
        order = self.order.index_select(0, new_order)  # composed with an order not yet applied
        if order.numel() == self.rows:
            self.order.copy_(order)
            return
        self.self_kv = [
            StaticKeyValue(kv.key.index_select(0, order), kv.value.index_select(0, order), self.position)
            for kv in self.self_kv
        ]
        self.identity = torch.arange(order.numel(), device=order.device)
        self.order = self.identity.clone()
        self.version += 1

    def select_sources(self, source_order: Tensor) -> None:
        super().select_sources(source_order)
        self.version += 1

    def apply_order(self) -> None:
        """Gather every layer's K/V rows by ``order``, then reset it (fixed kernels: part of a step)."""
        for kv in self.self_kv:
            kv.key.copy_(kv.key.index_select(0, self.order))
            kv.value.copy_(kv.value.index_select(0, self.order))
        self.order.copy_(self.identity)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.positions = PositionEmbedding(
            cfg.max_target_positions, cfg.d_model, cfg.positions == "learned", cfg.positions
        )
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model) if cfg.layernorm_embedding else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model) if cfg.normalize_before else None
        self.checkpoint_fn: Optional[Callable] = None

    def forward(self, embedded: Tensor, encoder_out: EncoderOut, cache: Optional[DecoderCache] = None) -> Tensor:
        """embedded: (B·beam)×t×d scaled embeddings of the new target positions → hidden (B·beam)×t×d.

        With a cache the t positions follow the ``cache.length`` already decoded, and the cache is updated.
        """
        offset = cache.length if cache is not None else 0
        x = self.embed_positions(embedded, self.positions(embedded.size(1), offset))
        if cache is not None and cache.source_kv is not None:
            source_kv = cache.source_kv
        else:
            source_kv = [layer.encoder_attn.source_key_value(encoder_out.hidden) for layer in self.layers]
            if cache is not None:
                cache.source_kv = source_kv
        if cache is not None and not cache.self_kv:
            cache.self_kv = [None] * len(self.layers)
        checkpoint = self.checkpoint_fn if (cache is None and torch.is_grad_enabled()) else None
        for index, layer in enumerate(self.layers):
            past = cache.self_kv[index] if cache is not None else None
            if checkpoint is not None:
                x = checkpoint(
                    _first_output(layer), x, source_kv[index][0], source_kv[index][1], encoder_out.attention_mask
                )
            else:
                x, present = layer(x, source_kv[index], encoder_out.attention_mask, past)
                if cache is not None:
                    cache.self_kv[index] = present
        if cache is not None:
            cache.length += embedded.size(1)
        return self.layer_norm(x) if self.layer_norm is not None else x

    def embed_positions(self, embedded: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings plus positions, [layernorm_embedding], dropout."""
        x = embedded + positions.to(embedded.dtype)
        return self.dropout(x if self.layernorm_embedding is None else self.layernorm_embedding(x))

    def new_static_cache(self, encoder_out: EncoderOut, rows: int, max_length: int) -> StaticDecoderCache:
        """A :class:`StaticDecoderCache` for ``rows`` decoder rows (source-major beams over the sources of
        ``encoder_out``) and up to ``max_length`` positions; the cross-attention K/V are computed here."""
        if max_length > self.positions.max_positions:
            raise ValueError(
                f"static decoder cache: {max_length} positions requested, the model has "
                f"{self.positions.max_positions} (max_target_positions)"
            )
        source_kv = [layer.encoder_attn.source_key_value(encoder_out.hidden) for layer in self.layers]
        key = source_kv[0][0]
        shape = (rows, key.size(1), max_length, key.size(3))
        position = torch.zeros(1, dtype=torch.long, device=key.device)
        self_kv = [StaticKeyValue(key.new_zeros(shape), key.new_zeros(shape), position) for _ in self.layers]
        return StaticDecoderCache(self_kv, source_kv)

    def static_step(self, embedded: Tensor, source_mask: Tensor, cache: StaticDecoderCache) -> Tensor:
        """One position for every row: embedded R×1×d → hidden R×1×d. Tensor operations only (no host
        sync, no Python-side state: ``cache.length`` is the caller's), so it can be captured and replayed."""
        cache.apply_order()
        x = self.embed_positions(embedded, self.positions.at(cache.position))
        for layer, source_kv, self_kv in zip(self.layers, cache.source_kv, cache.self_kv, strict=True):
            x, _ = layer(x, source_kv, source_mask, self_kv)
        cache.position.add_(1)
        return self.layer_norm(x) if self.layer_norm is not None else x


def _first_output(layer: DecoderLayer) -> Callable[..., Tensor]:
    """A checkpointable function of tensors only: (x, source_k, source_v, source_mask) → x."""

    def run(x, source_k, source_v, source_mask):
        return layer(x, (source_k, source_v), source_mask)[0]

    return run
