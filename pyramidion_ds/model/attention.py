"""Attention: blockwise encoder self-attention, cached causal self-attention, shared cross-attention.

All three go through ``torch.nn.functional.scaled_dot_product_attention``. Blockwise attention cuts a
width-n sequence into chunks and folds them into the batch::

    B×n×d ──pad to c·chunk──> B×(c·chunk)×d ──view──> (B·c)×H×chunk×dh ──SDPA──> back to B×n×d

Cross-attention keeps the encoder's K/V at one row per *source* (B×H×k×dh); the B·beam decoder rows
(source-major: row b·beam + j is beam j of source b) are folded into the query length instead, so the
K/V are computed once per source and never copied per beam.

Padding under ``torch.compile``: SDPA takes its fused FlashAttention kernel only without a mask, so a
compiled encoder layer whose batch has padding runs FlexAttention instead, with a block mask that holds
both the chunks and the padding (blocks outside every chunk are skipped, blocks with no padding run
unmasked); a batch without padding passes no mask at all and stays on SDPA. FlexAttention has no
backward on CPU, so a CPU graph that needs gradients keeps the masked SDPA. Eager calls always take
SDPA (:meth:`MultiheadAttention.fused_padding_attention` says which path a call takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the install
    create_block_mask = flex_attention = None

KeyValue = tuple[Tensor, Tensor]  # each B×H×L×dh


@dataclass
class StaticKeyValue:
    """A preallocated self-attention cache: K/V of R×H×T×dh, the next position written at ``position``.

    ``position`` is a 1-element long tensor on the device, so a decoding step has fixed shapes and reads
    no Python state: the same kernels every step, which is what a CUDA graph replays.
    """

    key: Tensor
    value: Tensor
    position: Tensor


#: separate projections that no module has since q/k/v (self) and k/v (cross) were fused: a parameter
#: name holding one was written before the fusion
PRE_FUSION_PROJECTIONS = ("k_proj", "v_proj")


class MultiheadAttention(nn.Module):
    """Self-attention with one fused ``qkv_proj`` (d → 3d), or cross-attention (``cross=True``) with
    ``q_proj`` (d → d) over the decoder and one fused ``kv_proj`` (d → 2d) over the encoder output;
    ``out_proj`` as in fairseq. The math is SDPA's.

    One matmul instead of three (two) means fewer kernels and fewer, larger parameter tensors (DeepSpeed
    scans and reduces per tensor). Rows of the fused weight are q, k, v in that order, each d×d, so a
    fairseq-style state dict with separate ``q_proj``/``k_proj``/``v_proj`` converts by concatenation
    (:func:`fuse_separate_projections`), which a load-state-dict pre-hook does on every load.
    """

    def __init__(self, d_model: int, num_heads: int, attention_dropout: float, cross: bool = False):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"attention: d_model {d_model} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.attention_dropout = attention_dropout
        self.is_cross = cross
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.register_load_state_dict_pre_hook(_fuse_on_load)

    def fused_names(self) -> dict[str, tuple[str, ...]]:
        """Fused projection name → the separate projections it replaces, in row order."""
        return {"kv_proj": ("k_proj", "v_proj")} if self.is_cross else {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: B×L×d → q, k, v each B×H×L×dh, from one matmul."""
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def split_heads(self, x: Tensor) -> Tensor:
        """B×L×d → B×H×L×dh"""
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """B×H×L×dh → B×L×d"""
        return x.transpose(1, 2).reshape(x.size(0), x.size(2), self.num_heads * self.head_dim)

    def _sdpa(self, q, k, v, attn_mask=None, is_causal=False) -> Tensor:
        dropout_p = self.attention_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    # -- encoder -------------------------------------------------------------------------------------
    def blockwise(self, x: Tensor, real_mask: Tensor, chunk_size: int) -> Tensor:
        """Self-attention inside chunks of ``chunk_size`` positions. x: B×n×d, real_mask: B×n (True = token).

        With ``chunk_size >= n`` this is full attention. Padding is never attended to; a chunk with no
        real token at all attends everywhere inside itself (its outputs are padding, kept finite).
        ``real_mask=None`` means no padding at all (no attention mask is built).
        """
        batch, n, d = x.shape
        chunk_size = min(chunk_size, n)
        pad = (-n) % chunk_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            if real_mask is None:
                real_mask = torch.ones(batch, n, dtype=torch.bool, device=x.device)
            real_mask = F.pad(real_mask, (0, pad), value=False)
        num_chunks = (n + pad) // chunk_size

        if real_mask is not None and self.fused_padding_attention(x):
            q, k, v = self._project_qkv(x)  # B×H×(n+pad)×dh: the block mask holds the chunks
            out = self.merge_heads(flex_attention(q, k, v, block_mask=chunk_block_mask(real_mask, chunk_size)))
            return self.out_proj(out[:, :n] if pad else out)
        attn_mask = None  # no padding anywhere: no mask, so SDPA may pick its flash kernel
        if real_mask is not None:
            key_mask = real_mask.reshape(batch * num_chunks, chunk_size)
            attn_mask = (key_mask | ~key_mask.any(dim=1, keepdim=True))[:, None, None, :]
        q, k, v = self._project_qkv(x.reshape(batch * num_chunks, chunk_size, d))  # (B·c)×H×chunk×dh
        out = self._sdpa(q, k, v, attn_mask=attn_mask)
        out = self.merge_heads(out).reshape(batch, n + pad, d)
        return self.out_proj(out[:, :n] if pad else out)

    def fused_padding_attention(self, x: Tensor) -> bool:
        """Whether a padded batch's blockwise attention runs FlexAttention: only inside a compiled graph
        (eagerly it would materialise the scores), without attention dropout (FlexAttention has none), and
        on CPU only without gradients (no CPU backward); for head sizes its kernels take (a power of two
        from 16)."""
        if flex_attention is None or not torch.compiler.is_compiling():
            return False
        if self.head_dim < 16 or self.head_dim & (self.head_dim - 1):
            return False
        if self.training and self.attention_dropout > 0:
            return False
        return x.is_cuda or not (torch.is_grad_enabled() and x.requires_grad)

    # -- decoder self-attention ------------------------------------------------------------------------
    def causal(
        self, x: Tensor, past: Union[KeyValue, StaticKeyValue, None] = None
    ) -> tuple[Tensor, Union[KeyValue, StaticKeyValue]]:
        """Causal self-attention of the t new positions x (B×t×d) after ``past`` (B×H×L0×dh each).

        Returns the output B×t×d and the K/V of all L0 + t positions (the next step's ``past``). With a
        :class:`StaticKeyValue` (one new position) the K/V are written into it in place and it is returned.
        """
        q, k, v = self._project_qkv(x)
        if isinstance(past, StaticKeyValue):
            if x.size(1) != 1:
                raise ValueError(f"static KV cache: one new position per step, got {x.size(1)}")
            past.key.index_copy_(2, past.position, k)
            past.value.index_copy_(2, past.position, v)
            visible = torch.arange(past.key.size(2), device=x.device) <= past.position  # T
            out = self._sdpa(q, past.key, past.value, attn_mask=visible.view(1, 1, 1, -1))
            return self.out_proj(self.merge_heads(out)), past
        past_length = 0
        if past is not None:
            past_length = past[0].size(2)
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        t = x.size(1)
        if t == 1:  # one new position sees everything before it
            out = self._sdpa(q, k, v)
        elif past_length == 0:
            out = self._sdpa(q, k, v, is_causal=True)
        else:  # new position i (absolute past_length + i) sees keys 0..past_length + i
            rows = torch.arange(t, device=x.device).unsqueeze(1) + past_length
            out = self._sdpa(q, k, v, attn_mask=torch.arange(past_length + t, device=x.device) <= rows)
        return self.out_proj(self.merge_heads(out)), (k, v)

    # -- cross-attention -------------------------------------------------------------------------------
    def source_key_value(self, encoder_hidden: Tensor) -> KeyValue:
        """K/V of the pooled encoder output B×k×d, once per source: B×H×k×dh each."""
        batch, length, _ = encoder_hidden.shape
        kv = self.kv_proj(encoder_hidden).view(batch, length, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def cross(self, x: Tensor, source_kv: KeyValue, source_mask: Optional[Tensor]) -> Tensor:
        """x: (B·beam)×t×d queries, source-major; source_kv: B×H×k×dh; source_mask: B×k (True = real), or
        None when no source has padding (SDPA then runs unmasked)."""
        num_sources = source_kv[0].size(0)
        rows, t, d = x.shape
        if rows % num_sources:
            raise ValueError(
                f"cross-attention: {rows} decoder rows are not a whole number of beams over {num_sources} sources"
            )
        beam = rows // num_sources
        q = self.split_heads(self.q_proj(x).reshape(num_sources, beam * t, d))  # B×H×(beam·t)×dh
        attn_mask = None if source_mask is None else source_mask[:, None, None, :]
        out = self._sdpa(q, source_kv[0], source_kv[1], attn_mask=attn_mask)
        return self.out_proj(self.merge_heads(out).reshape(rows, t, d))


def chunk_block_mask(real_mask: Tensor, chunk_size: int):
    """FlexAttention block mask of blockwise attention over real_mask (B×L, L a multiple of chunk_size):
    a query sees the keys of its own chunk that are real, or every key of a chunk without a real one
    (the SDPA path's rule, so padding outputs match too)."""
    batch, length = real_mask.shape
    empty_chunk = ~real_mask.view(batch, length // chunk_size, chunk_size).any(dim=-1)  # B×c

    def mask_mod(b, h, q_index, kv_index):
        chunk = kv_index // chunk_size
        return (q_index // chunk_size == chunk) & (real_mask[b, kv_index] | empty_chunk[b, chunk])

    return create_block_mask(mask_mod, batch, None, length, length, device=real_mask.device)


# -- checkpoints written before the fused projections ------------------------------------------------------
def fuse_separate_projections(state_dict: dict, prefix: str, fused: dict[str, tuple[str, ...]]) -> list[str]:
    """In ``state_dict``, replace ``{prefix}q_proj.weight`` etc. by their row-wise concatenation
    ``{prefix}qkv_proj.weight`` (biases likewise), as laid out by :class:`MultiheadAttention`.

    Only complete sets are fused; a partial set is left alone for the loader to report. Returns the fused
    names written (empty when ``state_dict`` already has the fused layout).
    """
    written = []
    for fused_name, parts in fused.items():
        for kind in ("weight", "bias"):
            names = [f"{prefix}{part}.{kind}" for part in parts]
            if all(name in state_dict for name in names):
                state_dict[f"{prefix}{fused_name}.{kind}"] = torch.cat([state_dict.pop(name) for name in names])
                written.append(f"{prefix}{fused_name}.{kind}")
    return written


def _fuse_on_load(module: MultiheadAttention, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: a checkpoint with separate q/k/v projections loads into fused ones."""
    fuse_separate_projections(state_dict, prefix, module.fused_names())
