"""Embeddings and transformer layers (pre- or post-norm), fairseq parameter names."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import KeyValue, MultiheadAttention


class TokenEmbedding(nn.Module):
    """The one token embedding: encoder input, decoder input and (tied) output projection.

    The output projection runs through this module's ``forward`` (``project=True``) so that ZeRO-3,
    which gathers a module's parameters around its forward, has the weight present in both uses.
    """

    def __init__(self, vocab_size: int, d_model: int, pad_id: int, scale: bool = True, logits_bias: bool = False):
        super().__init__()
        self.pad_id = pad_id
        self.scale = math.sqrt(d_model) if scale else 1.0
        if logits_bias:  # a buffer, as in BART/PEGASUS: saved and loaded, never trained
            self.register_buffer("final_logits_bias", torch.zeros(vocab_size))
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()

    def forward(self, tokens_or_hidden: Tensor, project: bool = False) -> Tensor:
        """tokens B×L → scaled embeddings B×L×d; or with ``project``, hidden B×L×d → logits B×L×V."""
        if project:
            bias = getattr(self, "final_logits_bias", None)
            return F.linear(tokens_or_hidden, self.weight, None if bias is None else bias.to(tokens_or_hidden.dtype))
        return F.embedding(tokens_or_hidden, self.weight, padding_idx=self.pad_id) * self.scale


class PositionEmbedding(nn.Module):
    """Sinusoidal (fairseq layout: sines then cosines; no parameters) or learned absolute positions.

    ``kind`` "sinusoidal_pegasus": the same layout with PEGASUS's frequencies 10000**(-2j/d) instead of
    fairseq's 10000**(-j/(d/2-1))."""

    def __init__(self, max_positions: int, d_model: int, learned: bool, kind: str = "sinusoidal"):
        super().__init__()
        self.max_positions = max_positions
        if learned:
            self.weight = nn.Parameter(torch.empty(max_positions, d_model))
            nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)
        else:
            half = d_model // 2
            if kind == "sinusoidal_pegasus":  # in float64 like the reference (numpy), then rounded
                freq = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / d_model)
                angles = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1) * freq.unsqueeze(0)
            else:
                freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000.0) / max(half - 1, 1)))
                angles = torch.arange(max_positions, dtype=torch.float).unsqueeze(1) * freq.unsqueeze(0)
            table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()
            if d_model % 2:
                table = F.pad(table, (0, 1))
            self.register_buffer("table", table, persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Embeddings of positions offset..offset+length-1: length×d."""
        if offset + length > self.max_positions:
            raise ValueError(
                f"positions: {offset + length} positions requested, the model has "
                f"{self.max_positions} (max_source_positions / max_target_positions)"
            )
        weight = self.weight if hasattr(self, "weight") else self.table
        return weight[offset : offset + length]

    def at(self, position: Tensor) -> Tensor:
        """Embedding of the position held in a 1-element long tensor: 1×d (no host sync, no bounds check)."""
        weight = self.weight if hasattr(self, "weight") else self.table
        return weight.index_select(0, position)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.activation = F.gelu if activation == "gelu" else F.relu
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))


class _Layer(nn.Module):
    """Shared residual wiring: pre-norm x + drop(f(norm(x))), or post-norm norm(x + drop(f(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.normalize_before = cfg.normalize_before
        self.dropout = nn.Dropout(cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def residual(self, x: Tensor, norm: nn.LayerNorm, branch: Callable[[Tensor], Tensor]) -> Tensor:
        if self.normalize_before:
            return x + self.dropout(branch(norm(x)))
        return norm(x + self.dropout(branch(x)))


class EncoderLayer(_Layer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.self_attn = MultiheadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, real_mask: Tensor, chunk_size: int) -> Tensor:
        """x: B×n×d, real_mask: B×n; attention inside chunks of ``chunk_size``."""
        x = self.residual(x, self.self_attn_layer_norm, lambda h: self.self_attn.blockwise(h, real_mask, chunk_size))
        return self.residual(x, self.final_layer_norm, self.ffn)


class DecoderLayer(_Layer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.self_attn = MultiheadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.encoder_attn = MultiheadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout, cross=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(
        self, x: Tensor, source_kv: KeyValue, source_mask: Tensor, past: Optional[KeyValue] = None
    ) -> tuple[Tensor, KeyValue]:
        """x: (B·beam)×t×d new positions; returns the output and this layer's self-attention K/V."""
        present = []

        def self_attention(h):
            out, kv = self.self_attn.causal(h, past)
            present.append(kv)
            return out

        x = self.residual(x, self.self_attn_layer_norm, self_attention)
        x = self.residual(x, self.encoder_attn_layer_norm, lambda h: self.encoder_attn.cross(h, source_kv, source_mask))
        return self.residual(x, self.final_layer_norm, self.ffn), present[0]
