"""PyramidionModel: tied embedding + pyramid encoder + cached decoder; the API trainer and generator share.

Plain PyTorch: DeepSpeed (ZeRO-3 construction, activation checkpointing) is applied from outside
through :meth:`PyramidionModel.set_activation_checkpointing` and ordinary module hooks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import MultiheadAttention, fuse_separate_projections
from .decoder import Decoder, DecoderCache, StaticDecoderCache
from .encoder import Encoder, EncoderOut, encoder_stages
from .layers import TokenEmbedding

GRANULARITIES = ("stage", "layer", "off")


class PyramidionModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError(
                "model.vocab_size: got 0, expected the vocabulary size (take it from the "
                "sentencepiece model before building the model)"
            )
        self.cfg = cfg
        self.embed_tokens = TokenEmbedding(
            cfg.vocab_size, cfg.d_model, cfg.pad_id, scale=cfg.scale_embedding, logits_bias=cfg.final_logits_bias
        )
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    # -- the API -----------------------------------------------------------------------------------------
    def encode(
        self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None, padded: Optional[bool] = None
    ) -> EncoderOut:
        """src_tokens B×n (right-padded with pad_id) → EncoderOut (hidden B×k×d, mask B×k, pooling info).

        ``padded=False``: the caller knows that no source has padding (no mask is built or synced on).
        """
        if src_tokens.size(1) > self.cfg.max_source_positions:
            raise ValueError(
                f"encode: source of {src_tokens.size(1)} tokens is longer than "
                f"model.max_source_positions ({self.cfg.max_source_positions})"
            )
        if src_lengths is None:
            real_mask = src_tokens.ne(self.cfg.pad_id)
        else:
            real_mask = torch.arange(src_tokens.size(1), device=src_tokens.device) < src_lengths.unsqueeze(1)
        return self.encoder(self.embed_tokens(src_tokens), real_mask, padded)

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor],
        prev_output_tokens: Tensor,
        padded: Optional[bool] = None,
    ) -> Tensor:
        """Teacher-forced logits B×t×V (``padded`` as in :meth:`encode`)."""
        encoder_out = self.encode(src_tokens, src_lengths, padded)
        hidden = self.decoder(self.embed_tokens(prev_output_tokens), encoder_out)
        return self.embed_tokens(hidden, project=True)

    def new_cache(self) -> DecoderCache:
        return DecoderCache()

    def new_static_cache(self, encoder_out: EncoderOut, rows: int, max_length: int) -> StaticDecoderCache:
        """A fixed-shape cache for ``rows`` decoder rows and ``max_length`` positions (CUDA-graph decoding)."""
        return self.decoder.new_static_cache(encoder_out, rows, max_length)

    def decode_step(self, prev_tokens: Tensor, encoder_out: EncoderOut, cache: Optional[DecoderCache] = None) -> Tensor:
        """Logits (B·beam)×V of the last position of ``prev_tokens`` ((B·beam)×t, all tokens so far).

        With a cache only the positions not yet in it are run (normally the last one) and the cache is
        updated in place; without one the whole prefix is decoded. ``encoder_out`` may hold one row per
        source (its beams are rows b·beam .. b·beam+beam-1 of ``prev_tokens``) or one per decoder row.
        A :class:`StaticDecoderCache` takes exactly one new position per call.
        """
        new_tokens = prev_tokens if cache is None else prev_tokens[:, cache.length :]
        if new_tokens.size(1) == 0:
            raise ValueError(
                f"decode_step: the cache already holds {cache.length} positions and prev_tokens "
                f"has {prev_tokens.size(1)}; nothing new to decode"
            )
        if isinstance(cache, StaticDecoderCache):
            logits = self.static_step(new_tokens, encoder_out.mask, cache)
            cache.length += 1
            return logits
        hidden = self.decoder(self.embed_tokens(new_tokens), encoder_out, cache)
        return self.embed_tokens(hidden[:, -1:], project=True).squeeze(1)

    def static_step(self, last_tokens: Tensor, source_mask: Tensor, cache: StaticDecoderCache) -> Tensor:
        """Logits R×V after the tokens R×1 at the cache's position: the CUDA-graph-capturable step
        (tensor operations only; the caller keeps ``cache.length``)."""
        if last_tokens.size(1) != 1:
            raise ValueError(f"static decoding: one new token per row and step, got {last_tokens.size(1)}")
        hidden = self.decoder.static_step(self.embed_tokens(last_tokens), source_mask, cache)
        return self.embed_tokens(hidden, project=True).squeeze(1)

    @staticmethod
    def reorder_cache(cache: DecoderCache, new_order: Tensor) -> DecoderCache:
        """Beam search: keep decoder rows ``new_order``; the per-source cross-attention K/V stay shared."""
        cache.reorder(new_order)
        return cache

    @staticmethod
    def expand_encoder_out(encoder_out: EncoderOut, beam: int) -> EncoderOut:
        """One row per hypothesis (b·beam + j). Not needed by decode_step, which shares a source's row."""
        order = torch.arange(encoder_out.hidden.size(0), device=encoder_out.hidden.device).repeat_interleave(beam)
        return encoder_out.select(order)

    def upgrade_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """A copy of a full state dict in this version's parameter layout (fairseq's ``upgrade_state_dict``).

        Separate attention projections (``q_proj``/``k_proj``/``v_proj``, written before they were fused)
        become ``qkv_proj`` / ``kv_proj``. ``load_state_dict`` does this by itself (a pre-hook on every
        attention module); loaders that compare names and shapes first, or copy tensor by tensor, call this.
        """
        upgraded = dict(state_dict)
        for name, module in self.named_modules():
            if isinstance(module, MultiheadAttention):
                fuse_separate_projections(upgraded, f"{name}." if name else "", module.fused_names())
        return upgraded

    # -- hooks for the training engine ---------------------------------------------------------------------
    def set_activation_checkpointing(self, checkpoint_fn: Optional[Callable], granularity: str = "stage") -> None:
        """Recompute activations in backward: one checkpoint per encoder stage ("stage") or per layer
        ("layer"); decoder layers are checkpointed one by one in both. ``checkpoint_fn(function, *args)``
        is e.g. ``deepspeed.checkpointing.checkpoint``; "off" or None disables it."""
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"activation checkpointing granularity: got {granularity!r}, expected one of {', '.join(GRANULARITIES)}"
            )
        if granularity == "off":
            checkpoint_fn = None
        self.encoder.checkpoint_fn = checkpoint_fn
        self.encoder.checkpoint_granularity = granularity if checkpoint_fn is not None else "off"
        self.decoder.checkpoint_fn = checkpoint_fn

    def flops_per_step(self, batch_size: int, src_len: int, tgt_len: int) -> float:
        """Analytic training FLOPs of one batch as this variant runs it (see :func:`training_flops`)."""
        return training_flops(self.cfg, batch_size, src_len, tgt_len)


def training_flops(cfg: ModelConfig, batch_size: int, src_len: int, tgt_len: int) -> float:
    """Analytic training FLOPs (forward + backward = 3× forward) of one batch, as this variant runs it.

    Counts matmuls (2 FLOPs per multiply-add) and attention score/value products over the chunk widths
    actually used; the decoder cross-attends to the pooled width. Norms, softmax and top-k are ignored.
    """
    d, f = cfg.d_model, cfg.ffn_dim
    encoder = 0
    width = src_len
    for stage in encoder_stages(cfg, src_len):
        per_layer = 2 * stage.width * (4 * d * d + 2 * d * f) + 4 * stage.width * stage.chunk_size * d
        encoder += per_layer * len(stage.layers)
        if stage.pooled_width is not None:
            encoder += 2 * stage.width * d  # scorer
            width = stage.pooled_width
    pooled = width
    decoder_layer = (
        2 * tgt_len * (4 * d * d + 2 * d * f)  # self-attn projections + FFN
        + 4 * tgt_len * tgt_len * d  # causal self-attention (full square)
        + 2 * tgt_len * 2 * d * d
        + 2 * pooled * 2 * d * d  # cross q/out, k/v projections
        + 4 * tgt_len * pooled * d
    )  # cross-attention
    output_projection = 2 * tgt_len * d * cfg.vocab_size
    forward = encoder + cfg.decoder_layers * decoder_layer + output_projection
    return float(3 * batch_size * forward)
