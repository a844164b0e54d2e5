"""The decoder: causal self-attention with an incremental KV cache, cross-attention over the pooled encoder.

The beam cache::

    DecoderCache
      self_kv[layer]   (B·beam)×H×t×dh   grows by one position per step; reorder_cache picks rows
      source_kv[layer] B×H×k×dh          computed on the first step from EncoderOut, one row per source,
                                         shared by that source's beams (rows b·beam .. b·beam+beam-1)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .attention import KeyValue
from .encoder import EncoderOut
from .layers import DecoderLayer, PositionEmbedding


@dataclass
class DecoderCache:
    self_kv: list[Optional[KeyValue]] = field(default_factory=list)
    source_kv: Optional[list[KeyValue]] = None
    length: int = 0  #: positions already decoded

    def reorder(self, new_order: Tensor) -> None:
        """Keep decoder rows ``new_order`` (beam search: each new row comes from a beam of the same source)."""
        self.self_kv = [None if kv is None else (kv[0].index_select(0, new_order), kv[1].index_select(0, new_order))
                        for kv in self.self_kv]

    def select_sources(self, source_order: Tensor) -> None:
        """Keep sources ``source_order`` in the shared cross-attention K/V (drop finished sources)."""
        if self.source_kv is not None:
            self.source_kv = [(k.index_select(0, source_order), v.index_select(0, source_order))
                              for k, v in self.source_kv]


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.positions = PositionEmbedding(cfg.max_target_positions, cfg.d_model, cfg.positions == "learned")
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model) if cfg.normalize_before else None
        self.checkpoint_fn: Optional[Callable] = None

    def forward(self, embedded: Tensor, encoder_out: EncoderOut, cache: Optional[DecoderCache] = None) -> Tensor:
        """embedded: (B·beam)×t×d scaled embeddings of the new target positions → hidden (B·beam)×t×d.

        With a cache the t positions follow the ``cache.length`` already decoded, and the cache is updated.
        """
        offset = cache.length if cache is not None else 0
        x = self.dropout(embedded + self.positions(embedded.size(1), offset).to(embedded.dtype))
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
                x = checkpoint(_first_output(layer), x, source_kv[index][0], source_kv[index][1], encoder_out.mask)
            else:
                x, present = layer(x, source_kv[index], encoder_out.mask, past)
                if cache is not None:
                    cache.self_kv[index] = present
        if cache is not None:
            cache.length += embedded.size(1)
        return self.layer_norm(x) if self.layer_norm is not None else x


def _first_output(layer: DecoderLayer):
    """A checkpointable function of tensors only: (x, source_k, source_v, source_mask) → x."""
    def run(x, source_k, source_v, source_mask):
        return layer(x, (source_k, source_v), source_mask)[0]
    return run
