"""Successive-halving top-k as Triton kernels on fixed-size blocks: a row is spread over many programs.

The same operator as :func:`pyramidion_ds.model.topk.successive_halving_topk` (see that module for the
rounds). Every kernel works on a fixed block (32 pairs, 128 positions, or 8 rows × 128 columns of d), so
registers and shared memory do not grow with the width, one compiled kernel serves every width, and a
row of n lanes runs as n/32 programs instead of one::

    forward                                              backward
    scores B×n, mask B×n                                 grad_values B×k×d, x B×n×d
      │ key_0 = where(mask, scores, -inf)       (torch)    │ _mix_backward (8 positions × d per program)
      │ per round r, width w → m:                          │   grad_x[p] = W(p)·grad_values[slot(p)]
      │   order = sort(key_r, descending, stable) (torch)  │   dW[p] = <x[p], grad_values[slot(p)]>
      │   sort_back: rank = sort(order[:, :m])   (torch)   ▼
      │   _plan_round   (B × m/32 programs) new slot j:   dW B×n, grad_pooled_scores B×k
      │     left = order[rank j], right = its partner      │ _plan_subtree, rounds 0 .. R-2 (B × m/32):
      │     pair weights, key_{r+1}[j]; per old slot:      │   T_{r+1}[j] = Σ_pair w·T_r       (T_0 = dW)
      │     up code 2j+side and its pair weight            │ _plan_reverse, rounds R-1 .. 0 (B × m/32):
      │ _plan_compose  (B × n/128; R > 1) each position    │   from the parent's Q (later weights) and A
      │   walks up the rounds: member table B×k×G, W(p),   │   (grad of its score): the pair's softmax
      │   slot(p), source_index (R = 1: _plan_round)       │   backward, Q and A of both members;
      ▼                                                    │   round 0 writes grad_scores (padding: 0)
    x B×n×d → _mix_forward (8 slots × 128 of d) → values   ▼
                                                         grad_scores B×n

Ranking is torch's stable descending sort of key = score (padding: -inf), the very call of the torch path,
so ties, padding and the pairing are those of the torch path by construction; the sort is segmented over
the batch and fills the GPU. New slot j of a round takes ``left = order[j]`` (with ``sort_back``:
``order[rank[j]]``, ``rank`` the argsort of the top m positions, i.e. document order), and for j past the
pass-through part ``right = order[w-1-(j-p)]`` (``flip_right``) or ``order[j+w-m]``; a pass-through slot's
partner is the torch path's dummy (logit -3e4, score 0). The saved plan per row: ``plan_index`` int32 =
[up code per slot of each level | left per new slot | right per new slot (-1 = dummy)] and ``plan_value``
float32 = [key per slot of each level | pair weight per slot of each level].

The backward of the rounds needs no division by weights: with T(c) = Σ_{p in c} dW[p]·(weight of p
inside c) swept forward and Q(c) = product of c's later pair weights swept back, the gradient into a
pair weight is Q·T + A·score (A: gradient of the slot's score), then the two-way softmax and
d(base**s)/ds = ln(base)·base**s.

The encoder's pooling is :func:`score_pool`: the scorer (x·w, centred over each row's real positions,
σ + 1e-5) fused into the same kernels, in one autograd node::

    _score_forward (B × n/128): logits x·w (+ b), the ranking key (padding -inf), per block Σ logits, count
    round 0 ranks by the logits (the scores' order, without the sigmoid's rounding ties); _plan_round reads the
      row's mean from the block sums and makes the scores σ(logit - mean) + 1e-5 itself
    one round (every pooling of the halving schedule): _plan_round also mixes the values and _plan_reverse
      takes dW itself, so _mix_forward and _mix_backward are not launched
    backward: the bottom _plan_reverse multiplies by σ' and writes per block Σ g; _score_backward
      (B × n/128) takes the centring's backward, writes grad_x = W·grad_values[slot] + g·w whole, and per
      program Σ g·x, summed into the weight's gradient

Four launches for a single round (3R + 4 for R rounds). Its scores, pooled scores and source_index stay in
the workspace until read (:class:`Statistics`): a training step reads none.

Eager calls run them from one autograd.Function, with one flat float32 workspace (plan values, W, plan
index, member table, slots, the backward's scratch, and score_pool's sections) instead of a tensor each: the
index data is held as exact float32 integers (every one below 2**24; :func:`supports` sends larger shapes to
the torch path), the kernels take each section's offset and convert what they load. Under torch.compile the
plain top-k runs as torch custom ops (fake shapes, registered autograd; separate int32 tensors), so dynamo
traces through without a graph break. Kernels run compiled on
CUDA tensors, or on CPU tensors through Triton's interpreter when the process imported triton with
``TRITON_INTERPRET=1`` (tests compare them with the torch path there). :func:`record_launches` runs the
launchers on meta tensors and records every launch without running one (tests, ``pyramidion-bench topk
--precompile``). ``triton`` is imported guardedly: :data:`AVAILABLE` is False without it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .topk import round_widths  # the rounds of both paths follow one rule

try:  # the model must import on installs without a working triton
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # pragma: no cover - depends on the install
    triton = tl = None
    AVAILABLE = False

#: logit of a padding slot (as the torch path): below every real token, weight 0 beside one
PAD_LOGIT = -1.0e4
#: Triton kernel launches made by this module (read by the launch-budget test and the benchmark)
launch_count = 0
#: True while a kernel runs (read by operator counters: the interpreter dispatches torch operators)
launching = False
#: (kernel name, grid) of the latest launches, newest last (tests check that every launch fills the GPU)
launch_grids: collections.deque = collections.deque(maxlen=256)
#: while :func:`record_launches` is active: the launches, recorded instead of run
_recorded: list | None = None

#: plan kernels: pairs (new slots) per program and warps; 32 pairs keep B=4, 8192→2048 at 256 programs
PAIR_BLOCK, PAIR_WARPS = 32, 1
#: positions per program of _plan_compose
POSITION_BLOCK, POSITION_WARPS = 128, 4
#: the scorer kernels (score_pool): positions per program, columns of d per step, warps (0 spills on sm_80
#: and sm_90 at every width, 32-58 registers; 4 warps spilled 8-20 B at d = 64)
SCORE_POSITIONS, SCORE_COLUMNS, SCORE_WARPS = 128, 32, 16
#: the largest index the kernels hold in int32: flat slots b·k + j and positions b·n + p, entries of the member
#: table, offsets inside one row of the saved plan (< 4n)
MAX_ELEMENTS = 2**31 - 1
#: float32 holds every integer below this exactly (the eager workspace's index data)
EXACT_INTEGERS = 2**24


def supports(batch: int, n: int, k: int, dim: Optional[int] = None) -> bool:
    """Whether the kernels take this shape (``dim``: score_pool's, with x B×n×dim); others run on the torch path
    (``model/topk.py``). The eager workspace holds index data as float32 integers: each must stay below 2**24
    (flat slots b·k + j, up codes < 2n), and its length within int32."""
    if not 0 < k < n:
        return False
    if batch * k >= EXACT_INTEGERS or 2 * n >= EXACT_INTEGERS:
        return False
    return _workspace_sections(batch, n, k, dim).end <= MAX_ELEMENTS


def launches_per_call(n: int, k: int, scorer: bool = False) -> int:
    """Triton launches of one forward + backward, n > k: R rounds + compose (none when R = 1: a single round
    writes what _plan_compose would) + mix, then mix + (R - 1) + R. ``scorer`` (score_pool): the scorer's two
    kernels more; a single round also mixes and takes dW in its plan kernels, so it is 4 launches in all."""
    rounds = len(round_widths(n, k))
    if scorer:
        return 4 if rounds == 1 else 3 * rounds + 4
    return 3 * rounds + 2 - (rounds == 1)


def planned_launches(batch: int, n: int, k: int, dim: int, dtype: torch.dtype, flip_right: bool, sort_back: bool):
    """Every launch of one forward + backward at this shape, of the plain top-k (:func:`pool`) and of score_pool
    (centred and not): a list of (kernel function, grid, args, meta), recorded on meta tensors, none run (what
    ``pyramidion-bench topk --precompile`` compiles and the compile-budget test checks)."""
    meta = functools.partial(torch.empty, device="meta")
    x = meta(batch, n, dim, dtype=dtype, requires_grad=True)
    scores = meta(batch, n, requires_grad=True)
    mask = meta(batch, n, dtype=torch.bool)
    weight, bias = meta(1, dim, dtype=dtype, requires_grad=True), meta(1, dtype=dtype, requires_grad=True)
    with record_launches() as launches:
        values, pooled, _, _ = pool(x, scores, mask, k, 20.0, flip_right, sort_back)
        torch.autograd.backward([values, pooled], [torch.empty_like(values), torch.empty_like(pooled)])
        for centre in (True, False):
            values, _, _ = score_pool(x, weight, None if centre else bias, mask, k, 20.0, flip_right, sort_back, centre)
            values.backward(torch.empty_like(values))
    return launches


class _Layout:
    """Section offsets of the saved plan for n → k (see the module docstring)."""

    def __init__(self, n: int, k: int):
        self.new_widths = round_widths(n, k)  # m_r
        self.widths = [n] + self.new_widths[:-1]  # w_r, the width each round starts from
        self.level_offsets = [sum(self.widths[:r]) for r in range(len(self.widths))]
        self.pair_offsets = [sum(self.new_widths[:r]) for r in range(len(self.new_widths))]
        self.level_length = sum(self.widths)  # L_w
        self.pair_length = sum(self.new_widths)  # L_m
        self.index_length = self.level_length + 2 * self.pair_length
        self.group = 2 ** len(self.new_widths)


# ----------------------------------------------------------------------------------------------- kernels
# Plain functions made kernels by _kernel() on first launch (triton.jit: compiled, or with TRITON_INTERPRET=1
# at triton's import, interpreted on CPU tensors). The plan kernels take no specialization on their integer
# arguments or pointer alignment: one compiled kernel per option set serves every width.


def _block_of_pairs(index_ptr, blocks, new_width, index_stride, pair_left, pair_right, BLOCK: tl.constexpr):
    """This program's row and new slots, and their left and right members (right -1: the dummy)."""
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    slot = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    live = slot < new_width
    index = index_ptr + row * index_stride
    left = tl.load(index + pair_left + slot, mask=live, other=0).to(tl.int32)
    right = tl.load(index + pair_right + slot, mask=live, other=-1).to(tl.int32)
    return row, slot, live, left, right, live & (right >= 0)


def _member_scores(keys, left, right, live, paired):
    """Keys of a pair's members: the keys, real (key > -inf) and score (padding and the dummy: 0) of each."""
    key_left = tl.load(keys + left, mask=live, other=0.0)
    key_right = tl.load(keys + right, mask=paired, other=0.0)
    real_left = key_left != -float("inf")
    real_right = paired & (key_right != -float("inf"))
    score_left = tl.where(real_left, key_left, 0.0)
    score_right = tl.where(real_right, key_right, 0.0)
    return key_left, key_right, real_left, real_right, score_left, score_right


def _plan_round(
    key_ptr,
    order_ptr,
    rank_ptr,
    index_ptr,
    value_ptr,
    pooled_scores_ptr,
    pooled_mask_ptr,
    members_ptr,
    wpos_ptr,
    slot_ptr,
    source_ptr,
    members_base,
    wpos_base,
    slot_base,
    width,
    new_width,
    blocks,
    order_stride,
    rank_stride,
    key_stride,
    key_offset,
    index_stride,
    value_stride,
    level_offset,
    level_length,
    pair_left,
    pair_right,
    next_offset,
    last,
    direct,
    log2_base,
    scores_base,
    partial_base,
    score_blocks,
    pooled_base,
    source_base,
    index_base,
    x_ptr,
    values_ptr,
    dim,
    FLIP: tl.constexpr,
    SORT_BACK: tl.constexpr,
    BLOCK: tl.constexpr,
    SCORER: tl.constexpr,
    CENTRE: tl.constexpr,
    MIX: tl.constexpr,
    MIX_DIM: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    slot = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    live = slot < new_width
    num_pass = 2 * new_width - width
    if SORT_BACK:  # document order: rank of the slot's left member among the top m
        rank = tl.load(rank_ptr + row * rank_stride + slot, mask=live, other=0)
    else:
        rank = slot.to(tl.int64)
    paired = live & (rank >= num_pass)
    if FLIP:
        partner_rank = width - 1 - (rank - num_pass)
    else:
        partner_rank = rank + (width - new_width)
    left = tl.load(order_ptr + row * order_stride + rank, mask=live, other=0)
    right = tl.load(order_ptr + row * order_stride + partner_rank, mask=paired, other=0)
    keys = key_ptr + row * key_stride + key_offset
    key_left, key_right, real_left, real_right, score_left, score_right = _member_scores(
        keys, left, right, live, paired
    )
    if SCORER:  # round 0 of score_pool: the keys are the scorer's logits; scores σ(logit - row mean) + 1e-5
        mean = 0.0
        if CENTRE:
            sums = value_ptr + partial_base + row * score_blocks * 2
            mean = _row_sum(sums, score_blocks, 2, BLOCK) / tl.maximum(_row_sum(sums + 1, score_blocks, 2, BLOCK), 1.0)
        score_left = tl.where(real_left, tl.sigmoid(key_left - mean) + 1e-5, 0.0)
        score_right = tl.where(real_right, tl.sigmoid(key_right - mean) + 1e-5, 0.0)
        key_left = tl.where(real_left, score_left, -float("inf"))
        key_right = tl.where(real_right, score_right, -float("inf"))
        scores_out = value_ptr + scores_base + row * width
        tl.store(scores_out + left, score_left, mask=live)
        tl.store(scores_out + right, score_right, mask=paired)
    # softmax of the pair's logits as the torch path: padding -1e4 (PAD_LOGIT), the dummy -3e4 (DUMMY_LOGIT)
    logit_left = tl.where(real_left, tl.exp2(score_left * log2_base), -1.0e4)
    logit_right = tl.where(real_right, tl.exp2(score_right * log2_base), tl.where(paired, -1.0e4, -3.0e4))
    top = tl.maximum(logit_left, logit_right)
    e_left = tl.exp(logit_left - top)
    e_right = tl.exp(logit_right - top)
    total = e_left + e_right
    weight_left = e_left / total
    weight_right = e_right / total
    new_score = score_left * weight_left + score_right * weight_right
    new_real = real_left | real_right
    # the plan: this level's keys (level 0 arrives as its own tensor), up codes and pair weights per old slot,
    # left and right member per new slot
    values = value_ptr + row * value_stride + level_offset
    tl.store(values + left, key_left, mask=live)
    tl.store(values + right, key_right, mask=paired)
    tl.store(values + level_length + left, weight_left, mask=live)
    tl.store(values + level_length + right, weight_right, mask=paired)
    index = index_ptr + index_base + row * index_stride
    tl.store(index + level_offset + left, 2 * slot, mask=live)
    tl.store(index + level_offset + right, 2 * slot + 1, mask=paired)
    tl.store(index + pair_left + slot, left.to(tl.int32), mask=live)
    tl.store(index + pair_right + slot, tl.where(paired, right.to(tl.int32), -1), mask=live)
    # the next level's keys, or after the last round the pooled scores and mask
    next_key = tl.where(new_real, new_score, -float("inf"))
    if last == 0:
        tl.store(value_ptr + row * value_stride + next_offset + slot, next_key, mask=live)
    else:
        tl.store(pooled_scores_ptr + pooled_base + row * new_width + slot, new_score, mask=live)
        tl.store(pooled_mask_ptr + row * new_width + slot, new_real, mask=live)
    if direct != 0:  # the only round: what _plan_compose makes (G = 2; the table's dummies are already n)
        flat_slot = row * new_width + slot
        tl.store(members_ptr + members_base + flat_slot * 2, left.to(tl.int32), mask=live)
        tl.store(members_ptr + members_base + flat_slot * 2 + 1, right.to(tl.int32), mask=paired)
        positions = row * width
        tl.store(wpos_ptr + wpos_base + positions + left, weight_left, mask=live)
        tl.store(wpos_ptr + wpos_base + positions + right, weight_right, mask=paired)
        tl.store(slot_ptr + slot_base + positions + left, flat_slot.to(tl.int32), mask=live)
        tl.store(slot_ptr + slot_base + positions + right, flat_slot.to(tl.int32), mask=paired)
        tl.store(source_ptr + source_base + flat_slot, left.to(source_ptr.dtype.element_ty), mask=live)
        if MIX:  # and the values (what _mix_forward would do): w_left·x[left] + w_right·x[right]
            rows = x_ptr + row * width * dim
            for start in range(0, dim, MIX_DIM):
                cols = start + tl.arange(0, MIX_DIM)
                col_ok = cols[None, :] < dim
                x_left = tl.load(rows + left[:, None] * dim + cols[None, :], mask=live[:, None] & col_ok, other=0.0)
                x_right = tl.load(rows + right[:, None] * dim + cols[None, :], mask=paired[:, None] & col_ok, other=0.0)
                mixed = weight_left[:, None] * x_left.to(tl.float32) + weight_right[:, None] * x_right.to(tl.float32)
                tl.store(
                    values_ptr + flat_slot[:, None] * dim + cols[None, :],
                    mixed.to(values_ptr.dtype.element_ty),
                    mask=live[:, None] & col_ok,
                )


def _plan_compose(
    index_ptr,
    value_ptr,
    members_ptr,
    wpos_ptr,
    slot_ptr,
    source_ptr,
    members_base,
    wpos_base,
    slot_base,
    n,
    k,
    num_rounds,
    group,
    blocks,
    index_stride,
    value_stride,
    level_length,
    source_base,
    index_base,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    position = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    live = position < n
    index = index_ptr + index_base + row * index_stride
    weights = value_ptr + row * value_stride + level_length
    # every position walks up the rounds: its slot, the product of its pair weights, left/right bits
    slot = position
    weight = tl.full([BLOCK], 1.0, tl.float32)
    bits = tl.zeros([BLOCK], tl.int32)
    width = n
    offset = 0
    for r in range(num_rounds):
        code = tl.load(index + offset + slot, mask=live, other=0).to(tl.int32)
        weight = weight * tl.load(weights + offset + slot, mask=live, other=0.0)
        bits = bits | ((code & 1) << r)
        slot = code >> 1
        offset += width
        width = tl.maximum(k, (width + 1) // 2)
    flat_slot = row * k + slot
    tl.store(members_ptr + members_base + flat_slot * group + bits, position, mask=live)
    tl.store(wpos_ptr + wpos_base + row * n + position, weight, mask=live)
    tl.store(slot_ptr + slot_base + row * n + position, flat_slot.to(tl.int32), mask=live)
    tl.store(source_ptr + source_base + flat_slot, position.to(source_ptr.dtype.element_ty), mask=live & (bits == 0))


def _plan_subtree(
    index_ptr,
    value_ptr,
    in_ptr,
    out_ptr,
    new_width,
    blocks,
    index_stride,
    value_stride,
    weight_offset,
    pair_left,
    pair_right,
    in_stride,
    in_offset,
    out_stride,
    out_offset,
    index_base,
    BLOCK: tl.constexpr,
):
    row, slot, live, left, right, paired = _block_of_pairs(
        index_ptr + index_base, blocks, new_width, index_stride, pair_left, pair_right, BLOCK
    )
    weights = value_ptr + row * value_stride + weight_offset
    below = in_ptr + row * in_stride + in_offset
    value = tl.load(weights + left, mask=live, other=0.0) * tl.load(below + left, mask=live, other=0.0)
    value += tl.load(weights + right, mask=paired, other=0.0) * tl.load(below + right, mask=paired, other=0.0)
    tl.store(out_ptr + row * out_stride + out_offset + slot, value, mask=live)


def _plan_reverse(
    index_ptr,
    value_ptr,
    subtree_ptr,
    q_in_ptr,
    a_in_ptr,
    q_out_ptr,
    a_out_ptr,
    new_width,
    blocks,
    index_stride,
    value_stride,
    key_offset,
    weight_offset,
    pair_left,
    pair_right,
    subtree_stride,
    subtree_offset,
    in_stride,
    q_in_offset,
    a_in_offset,
    out_stride,
    q_out_offset,
    a_out_offset,
    top,
    bottom,
    log2_base,
    ln_base,
    gc_partial_base,
    x_ptr,
    grad_values_ptr,
    width,
    dim,
    index_base,
    BLOCK: tl.constexpr,
    SCORER: tl.constexpr,
    DW: tl.constexpr,
    MIX_DIM: tl.constexpr,
):
    row, slot, live, left, right, paired = _block_of_pairs(
        index_ptr + index_base, blocks, new_width, index_stride, pair_left, pair_right, BLOCK
    )
    right = tl.where(paired, right, 0)
    if DW:  # a single round: dW of both members here (what _mix_backward would give): <x[p], grad_values[slot]>
        rows = x_ptr + row * width * dim
        grad_rows = grad_values_ptr + (row * new_width + slot)[:, None] * dim
        left, right = left.to(tl.int64), right.to(tl.int64)
        below_left = tl.zeros([BLOCK], tl.float32)
        below_right = tl.zeros([BLOCK], tl.float32)
        for start in range(0, dim, MIX_DIM):
            cols = start + tl.arange(0, MIX_DIM)
            col_ok = cols[None, :] < dim
            grad_value = tl.load(grad_rows + cols[None, :], mask=live[:, None] & col_ok, other=0.0).to(tl.float32)
            x_left = tl.load(rows + left[:, None] * dim + cols[None, :], mask=live[:, None] & col_ok, other=0.0)
            x_right = tl.load(rows + right[:, None] * dim + cols[None, :], mask=paired[:, None] & col_ok, other=0.0)
            below_left += tl.sum(x_left.to(tl.float32) * grad_value, axis=1)
            below_right += tl.sum(x_right.to(tl.float32) * grad_value, axis=1)
    # the parent: Q = product of its later pair weights (1 at the top), A = gradient of its score
    later = tl.full([BLOCK], 1.0, tl.float32)
    if top == 0:
        later = tl.load(q_in_ptr + row * in_stride + q_in_offset + slot, mask=live, other=1.0)
    # in_stride 0: no gradient reached the pooled scores (the encoder's case), read as 0 without a zeros tensor
    has_adjoint = slot < new_width * tl.minimum(in_stride, 1)
    adjoint = tl.load(a_in_ptr + row * in_stride + a_in_offset + slot, mask=has_adjoint, other=0.0)
    keys = value_ptr + row * value_stride + key_offset
    weights = value_ptr + row * value_stride + weight_offset
    subtree = subtree_ptr + row * subtree_stride + subtree_offset
    key_left, key_right, real_left, real_right, score_left, score_right = _member_scores(
        keys, left, right, live, paired
    )
    weight_left = tl.load(weights + left, mask=live, other=0.0)
    weight_right = tl.load(weights + right, mask=paired, other=0.0)
    if not DW:
        below_left = tl.load(subtree + left, mask=live, other=0.0)
        below_right = tl.load(subtree + right, mask=paired, other=0.0)
    grad_left = later * below_left + adjoint * score_left
    grad_right = tl.where(paired, later * below_right + adjoint * score_right, 0.0)
    # softmax backward over the pair, as torch writes it: w_i (g_i - Σ_j w_j g_j)
    dot = weight_left * grad_left + weight_right * grad_right
    grad_logit_left = weight_left * (grad_left - dot)
    grad_logit_right = weight_right * (grad_right - dot)
    logit_left = tl.exp2(score_left * log2_base)
    logit_right = tl.exp2(score_right * log2_base)
    adjoint_left = adjoint * weight_left + tl.where(real_left, grad_logit_left * (logit_left * ln_base), 0.0)
    adjoint_right = adjoint * weight_right + tl.where(real_right, grad_logit_right * (logit_right * ln_base), 0.0)
    # round 0 writes the scores' gradient, 0 at padding (the torch path reads padding scores as a constant 0)
    a_out = a_out_ptr + row * out_stride + a_out_offset
    if bottom != 0:
        grad_left = tl.where(live & real_left, adjoint_left, 0.0)
        grad_right = tl.where(real_right, adjoint_right, 0.0)
        if SCORER:  # through the sigmoid: the logits' gradient (before centring), and its sum per block
            sigmoid_left = score_left - 1e-5
            sigmoid_right = score_right - 1e-5
            grad_left = grad_left * sigmoid_left * (1.0 - sigmoid_left)
            grad_right = grad_right * sigmoid_right * (1.0 - sigmoid_right)
            block = tl.program_id(0) % blocks
            tl.store(a_out_ptr + gc_partial_base + row * blocks + block, tl.sum(grad_left + grad_right, axis=0))
        tl.store(a_out + left, grad_left, mask=live)
        tl.store(a_out + right, grad_right, mask=paired)
    else:
        tl.store(a_out + left, adjoint_left, mask=live)
        tl.store(a_out + right, adjoint_right, mask=paired)
        q_out = q_out_ptr + row * out_stride + q_out_offset
        tl.store(q_out + left, weight_left * later, mask=live)
        tl.store(q_out + right, weight_right * later, mask=paired)


def _mix_forward(
    x_ptr,
    wpos_ptr,
    members_ptr,
    values_ptr,
    wpos_base,
    members_base,
    n,
    k,
    dim,
    group,
    total_slots,
    BLOCK_SLOTS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    slots = tl.program_id(0).to(tl.int64) * BLOCK_SLOTS + tl.arange(0, BLOCK_SLOTS)
    cols = tl.program_id(1) * BLOCK_DIM + tl.arange(0, BLOCK_DIM)
    valid = slots < total_slots
    col_ok = cols < dim
    row_start = (slots // k) * n
    acc = tl.zeros([BLOCK_SLOTS, BLOCK_DIM], tl.float32)
    for g in range(group):
        member = tl.load(members_ptr + members_base + slots * group + g, mask=valid, other=0).to(tl.int32)
        real = valid & (member < n)
        position = row_start + member
        weight = tl.load(wpos_ptr + wpos_base + position, mask=real, other=0.0)
        rows = tl.load(x_ptr + position[:, None] * dim + cols[None, :], mask=real[:, None] & col_ok[None, :], other=0.0)
        acc += weight[:, None] * rows.to(tl.float32)
    tl.store(
        values_ptr + slots[:, None] * dim + cols[None, :],
        acc.to(values_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )


def _mix_backward(
    x_ptr,
    grad_values_ptr,
    wpos_ptr,
    slot_ptr,
    grad_x_ptr,
    grad_wpos_ptr,
    wpos_base,
    slot_base,
    grad_wpos_base,
    total_positions,
    dim,
    BLOCK_POSITIONS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    WRITE_GRAD_X: tl.constexpr,
):
    positions = tl.program_id(0).to(tl.int64) * BLOCK_POSITIONS + tl.arange(0, BLOCK_POSITIONS)
    valid = positions < total_positions
    slot = tl.load(slot_ptr + slot_base + positions, mask=valid, other=0).to(tl.int64)
    weight = tl.load(wpos_ptr + wpos_base + positions, mask=valid, other=0.0)
    dot = tl.zeros([BLOCK_POSITIONS], tl.float32)
    for start in range(0, dim, BLOCK_DIM):
        cols = start + tl.arange(0, BLOCK_DIM)
        ok = valid[:, None] & (cols < dim)[None, :]
        grad_rows = tl.load(grad_values_ptr + slot[:, None] * dim + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rows = tl.load(x_ptr + positions[:, None] * dim + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if WRITE_GRAD_X:  # (score_pool writes grad_x in _score_backward, with the scorer's part)
            tl.store(
                grad_x_ptr + positions[:, None] * dim + cols[None, :],
                (weight[:, None] * grad_rows).to(grad_x_ptr.dtype.element_ty),
                mask=ok,
            )
        dot += tl.sum(grad_rows * rows, axis=1)
    tl.store(grad_wpos_ptr + grad_wpos_base + positions, dot, mask=valid)


def _row_sum(ptr, count, stride, BLOCK: tl.constexpr):
    """Σ ptr[i · stride] for i < count (a row's per-block partial sums)."""
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        index = start + tl.arange(0, BLOCK)
        total += tl.load(ptr + index * stride, mask=index < count, other=0.0)
    return tl.sum(total, axis=0)


def _score_forward(
    x_ptr,
    weight_ptr,
    bias_ptr,
    mask_ptr,
    key_ptr,
    value_ptr,
    partial_base,
    n,
    dim,
    blocks,
    use_bias,
    BLOCK_POSITIONS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """The scorer's logits x·w (+ b) of a block of positions: the ranking key (padding -inf) and the block's
    sum of real logits and count of real positions (for the row's mean)."""
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    block = pid % blocks
    position = block * BLOCK_POSITIONS + tl.arange(0, BLOCK_POSITIONS)
    live = position < n
    flat = row * n + position
    logit = tl.zeros([BLOCK_POSITIONS], tl.float32)
    for start in range(0, dim, BLOCK_DIM):
        cols = start + tl.arange(0, BLOCK_DIM)
        col_ok = cols < dim
        rows = tl.load(x_ptr + flat[:, None] * dim + cols[None, :], mask=live[:, None] & col_ok[None, :], other=0.0)
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        logit += tl.sum(rows.to(tl.float32) * weight[None, :], axis=1)
    if use_bias != 0:
        logit += tl.load(bias_ptr).to(tl.float32)
    real = live & (tl.load(mask_ptr + flat, mask=live, other=0) != 0)
    tl.store(key_ptr + flat, tl.where(real, logit, -float("inf")), mask=live)
    sums = value_ptr + partial_base + (row * blocks + block) * 2
    tl.store(sums, tl.sum(tl.where(real, logit, 0.0), axis=0))
    tl.store(sums + 1, tl.sum(real.to(tl.float32), axis=0))


def _score_backward(
    x_ptr,
    weight_ptr,
    grad_values_ptr,
    value_ptr,
    index_ptr,
    grad_x_ptr,
    value_stride,
    partial_base,
    wpos_base,
    slot_base,
    gc_base,
    gc_partial_base,
    gc_blocks,
    weight_grad_base,
    n,
    dim,
    blocks,
    write_grad_weight,
    BLOCK_POSITIONS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    CENTRE: tl.constexpr,
):
    """score_pool's grad_x and the scorer's backward for a block of positions, from g (the logits' gradient
    through the top-k): centring's backward g - mean over the row's real positions, then
    grad_x = W(p)·grad_values[slot(p)] + g·w, and this block's Σ g·x (and Σ g: the bias's) for the weight."""
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    position = (pid % blocks) * BLOCK_POSITIONS + tl.arange(0, BLOCK_POSITIONS)
    live = position < n
    flat = row * n + position
    level_keys = value_ptr + row * value_stride  # round 0's keys in the plan: the scores, padding -inf
    real = live & (tl.load(level_keys + position, mask=live, other=-float("inf")) != -float("inf"))
    grad = tl.load(value_ptr + gc_base + flat, mask=live, other=0.0)
    if CENTRE:
        total = _row_sum(value_ptr + gc_partial_base + row * gc_blocks, gc_blocks, 1, BLOCK_POSITIONS)
        sums = value_ptr + partial_base + row * blocks * 2 + 1
        count = tl.maximum(_row_sum(sums, blocks, 2, BLOCK_POSITIONS), 1.0)
        grad = tl.where(real, grad - total / count, 0.0)
    weight_of_position = tl.load(value_ptr + wpos_base + flat, mask=live, other=0.0)
    slot = tl.load(index_ptr + slot_base + flat, mask=live, other=0).to(tl.int64)
    for start in range(0, dim, BLOCK_DIM):
        cols = start + tl.arange(0, BLOCK_DIM)
        col_ok = cols < dim
        tile = flat[:, None] * dim + cols[None, :]
        ok = live[:, None] & col_ok[None, :]
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        grad_rows = tl.load(grad_values_ptr + slot[:, None] * dim + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        grad_x = weight_of_position[:, None] * grad_rows + grad[:, None] * weight[None, :]
        tl.store(grad_x_ptr + tile, grad_x.to(grad_x_ptr.dtype.element_ty), mask=ok)
        if write_grad_weight != 0:
            rows = tl.load(x_ptr + tile, mask=ok, other=0.0).to(tl.float32)
            out = value_ptr + weight_grad_base + pid.to(tl.int64) * (dim + 1)
            tl.store(out + cols, tl.sum(grad[:, None] * rows, axis=0), mask=col_ok)
    if write_grad_weight != 0:  # the bias's: Σ g (0 when centred)
        tl.store(value_ptr + weight_grad_base + pid.to(tl.int64) * (dim + 1) + dim, tl.sum(grad, axis=0))


if AVAILABLE:  # device functions called by the kernels
    _block_of_pairs = triton.jit(_block_of_pairs)
    _member_scores = triton.jit(_member_scores)
    _row_sum = triton.jit(_row_sum)

#: the plan kernels: no specialization on integers or pointer alignment (one compiled kernel for all widths)
_UNSPECIALIZED = ("_plan_round", "_plan_compose", "_plan_subtree", "_plan_reverse")


#: arguments of the mix kernels not specialized: section offsets inside the workspaces (0 on the custom-op path)
_BASES = (
    "wpos_base",
    "members_base",
    "slot_base",
    "key_base",
    "partial_base",
    "gc_base",
    "gc_partial_base",
    "weight_grad_base",
)


@functools.cache
def _kernel(fn):
    if fn.__name__ not in _UNSPECIALIZED:
        bases = [name for name in inspect.signature(fn).parameters if name in _BASES]
        return triton.jit(fn, do_not_specialize=bases, do_not_specialize_on_alignment=bases)
    runtime = [name for name, p in inspect.signature(fn).parameters.items() if "constexpr" not in str(p.annotation)]
    return triton.jit(fn, do_not_specialize=runtime, do_not_specialize_on_alignment=runtime)


def interpreted() -> bool:
    """Whether triton was imported with ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors)."""
    return AVAILABLE and type(tl.zeros).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def record_launches():
    """Inside the block, launches are recorded (kernel function, grid, args, meta) instead of run; call the
    launchers with meta tensors (``device="meta"``) to list every launch of a shape without computing."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def _launch(fn, grid, *args, **meta):
    global launch_count, launching
    if _recorded is not None:
        _recorded.append((fn, grid, args, meta))
        launch_grids.append((fn.__name__, grid))
        return
    if not args[0].is_cuda and not interpreted():
        raise RuntimeError(
            "the Triton top-k kernels take CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported"
        )
    launch_count += 1
    launch_grids.append((fn.__name__, grid))
    launching = True  # the interpreter runs torch operators of its own; counters skip those
    try:
        _kernel(fn)[grid](*args, **meta)
    finally:
        launching = False


#: mix tiles: rows (slots or positions) × columns of d per program; 8×128 over 4 warps is one 16-byte
#: vector per thread: 78 / 56 registers (forward / backward) compiled for sm_90, against 222 / 255 with
#: spills at 32×128
MIX_ROWS, MIX_COLUMNS = 8, 128
#: a single round's plan kernels also mix (forward) or take dW (score_pool's backward): 32 pairs × 64 columns of d
#: per step, over 8 warps (0 spills; 117 / 170 registers for the round / reverse kernel, sm_80)
MIX_COLUMNS_IN_PLAN, MIX_WARPS_IN_PLAN = 64, 8


# ------------------------------------------------------------------------------------------- launchers


class _Sections(NamedTuple):
    """Where each section starts: 0 everywhere when each is a tensor of its own (the custom ops), else inside
    the one flat float32 workspace of an eager call, which holds the plan's index data as exact integers
    (every one below 2**24, see :func:`supports`)::

        plan values B×2·L_w | weight_of_position B×n | plan index B×(L_w + 2·L_m) | members B×k×G | slot B×n |
        scratch: dW B×n, plan_backward's work B×3·L_m
        [score_pool: the logits' sums and real counts per block of SCORE_POSITIONS B×blocks×2 | scores B×n |
         pooled scores B×k | source_index B×k | g, the logits' gradient, B×n | its sums per block of round 0's
         pairs B×pair_blocks | per scorer program Σ g·x and Σ g, programs×(d + 1)]
    """

    members: int = 0
    slot: int = 0
    wpos: int = 0
    index: int = 0
    scratch: int = 0
    end: int = 0  #: the workspace's length
    partial: int = 0
    scores: int = 0
    pooled: int = 0
    source: int = 0
    gc: int = 0
    gc_partial: int = 0
    pair_blocks: int = 0
    weight_grad: int = 0
    programs: int = 0


#: sections of tensors of their own
SEPARATE = _Sections()


def _workspace_sections(batch: int, n: int, k: int, dim: Optional[int] = None) -> _Sections:
    """The eager workspace's sections for n → k; with ``dim`` (the width of x), score_pool's (see _Sections)."""
    layout = _Layout(n, k)
    lengths = {
        "values": batch * 2 * layout.level_length,
        "wpos": batch * n,
        "index": batch * layout.index_length,
        "members": batch * k * layout.group,
        "slot": batch * n,
        "scratch": batch * (n + 3 * layout.pair_length),
    }
    pair_blocks = triton.cdiv(layout.new_widths[0], PAIR_BLOCK)
    programs = batch * triton.cdiv(n, SCORE_POSITIONS)
    if dim is not None:
        lengths.update(
            partial=programs * 2,
            scores=batch * n,
            pooled=batch * k,
            source=batch * k,
            gc=batch * n,
            gc_partial=batch * pair_blocks,
            weight_grad=programs * (dim + 1),
        )
    starts, offset = {}, 0
    for name, length in lengths.items():
        starts[name], offset = offset, offset + length
    del starts["values"]
    if dim is None:
        return _Sections(**starts, end=offset)
    return _Sections(**starts, end=offset, pair_blocks=pair_blocks, programs=programs)


@functools.cache
def _negative_infinity(device: torch.device) -> Tensor:
    """A 0-dim float32 -inf on ``device`` (read only)."""
    return torch.tensor(-math.inf, dtype=torch.float32, device=device)


def plan_forward(
    scores: Optional[Tensor],
    mask: Tensor,
    k: int,
    base: float,
    flip_right: bool,
    sort_back: bool,
    shared: bool = False,
    rank_key: Optional[Tensor] = None,
    scorer: Optional[tuple] = None,
    mix: Optional[tuple[Tensor, Tensor]] = None,
):
    """The rounds on scores. scores: B×n float32 (padding entries are read as 0), mask: B×n bool.

    Returns members B×k×G int32 (dummy = n), weight_of_position B×n float32, slot_of_position B×n int32
    (flat b·k + slot), pooled scores B×k float32, pooled mask B×k bool, source_index B×k int64 (with
    ``scorer``: the workspace, which holds them), and the saved plan: index B×(L_w + 2·L_m) int32 and values
    B×2·L_w float32 (see the module docstring). ``shared``: the plan, members, slot_of_position,
    weight_of_position and the backward's scratch are one flat float32 workspace (sections:
    :func:`_workspace_sections`; index data as exact integers), one allocation instead of seven (eager calls;
    a custom op may not return aliasing outputs). ``rank_key`` (B×n) ranks the
    first round instead of the scores. ``scorer`` = (x, weight, bias or None, centre), with ``shared`` and no
    ``scores``: the scores are the scorer's, made by the kernels (score_pool). ``mix`` = (x, values): a single
    round also writes the pooled values (what :func:`mix_forward` does), in its own kernel.
    """
    batch, n = mask.shape
    layout = _Layout(n, k)
    num_rounds, group = len(layout.new_widths), layout.group
    index_stride, value_stride = layout.index_length, 2 * layout.level_length
    new = functools.partial(torch.empty, device=mask.device)
    if shared:  # one float32 workspace, all of it n to start with: the member table's dummies
        sections = _workspace_sections(batch, n, k, None if scorer is None else scorer[0].size(2))
        workspace = torch.full((sections.end,), float(n), dtype=torch.float32, device=mask.device)
        plan_index = plan_value = members = weight_of_position = slot_of_position = workspace
    else:
        sections = SEPARATE
        plan_index = new(batch, index_stride, dtype=torch.int32)
        plan_value = new(batch, value_stride, dtype=torch.float32)
        members = torch.full((batch, k, group), n, dtype=torch.int32, device=mask.device)
        weight_of_position = new(batch, n, dtype=torch.float32)
        slot_of_position = new(batch, n, dtype=torch.int32)
    pooled_mask = new(batch, k, dtype=torch.bool)
    score_blocks = triton.cdiv(n, SCORE_POSITIONS)
    if scorer is not None:  # level 0 keys: the scorer's logits (padding -inf)
        pooled_scores = source_index = plan_value  # statistics: in the workspace, read when asked for
        x, weight, bias, centre = scorer
        keys = new(batch, n, dtype=torch.float32)
        _launch(
            _score_forward,
            (batch * score_blocks,),
            x,
            weight,
            weight if bias is None else bias,
            mask.contiguous(),
            keys,
            plan_value,
            sections.partial,
            n,
            x.size(2),
            score_blocks,
            int(bias is not None),
            BLOCK_POSITIONS=SCORE_POSITIONS,
            BLOCK_DIM=SCORE_COLUMNS,
            num_warps=SCORE_WARPS,
        )
        ranking = keys
    else:
        pooled_scores = new(batch, k, dtype=torch.float32)
        source_index = new(batch, k, dtype=torch.int64)
        # level 0 keys: the torch path's ranking key (padding -inf); the first round copies them into the plan
        # contiguous: row stride n; -inf as a cached tensor (a Python scalar dispatches one scalar_tensor per call)
        centre = False
        keys = torch.where(mask.contiguous(), scores.contiguous(), _negative_infinity(scores.device))
        ranking = keys
        if rank_key is not None:
            ranking = torch.where(mask, rank_key.to(torch.float32), _negative_infinity(scores.device))
    key_stride, key_offset = n, 0
    log2_base = math.log2(base)
    fused_mix = mix is not None and num_rounds == 1  # (else the pointers are placeholders, never read)
    mixing, dim = (mix, mix[0].size(2)) if fused_mix else ((keys, keys), 1)
    for r, (width, new_width) in enumerate(zip(layout.widths, layout.new_widths, strict=True)):
        level = layout.level_offsets[r]
        if r:
            keys, key_stride, key_offset = plan_value, value_stride, level
            level_keys = plan_value.as_strided((batch, width), (value_stride, 1), level)
        else:
            level_keys = ranking
        order = level_keys.sort(dim=1, descending=True, stable=True).indices
        rank = order[:, :new_width].sort(dim=1).indices if sort_back else order
        blocks = triton.cdiv(new_width, PAIR_BLOCK)
        last = r == num_rounds - 1
        _launch(
            _plan_round,
            (batch * blocks,),
            keys,
            order,
            rank,
            plan_index,
            plan_value,
            pooled_scores,
            pooled_mask,
            members,
            weight_of_position,
            slot_of_position,
            source_index,
            sections.members,
            sections.wpos,
            sections.slot,
            width,
            new_width,
            blocks,
            order.stride(0),
            rank.stride(0),
            key_stride,
            key_offset,
            index_stride,
            value_stride,
            level,
            layout.level_length,
            layout.level_length + layout.pair_offsets[r],
            layout.level_length + layout.pair_length + layout.pair_offsets[r],
            0 if last else layout.level_offsets[r + 1],
            int(last),
            int(num_rounds == 1),
            log2_base,
            sections.scores,
            sections.partial,
            score_blocks,
            sections.pooled,
            sections.source,
            sections.index,
            *mixing,
            dim,
            FLIP=flip_right,
            SORT_BACK=sort_back,
            BLOCK=PAIR_BLOCK,
            SCORER=scorer is not None and r == 0,
            CENTRE=bool(centre),
            MIX=fused_mix,
            MIX_DIM=MIX_COLUMNS_IN_PLAN,
            num_warps=MIX_WARPS_IN_PLAN if fused_mix else PAIR_WARPS,
        )
    if num_rounds > 1:  # (one round: _plan_round wrote the member table, W, slots and source_index)
        blocks = triton.cdiv(n, POSITION_BLOCK)
        _launch(
            _plan_compose,
            (batch * blocks,),
            plan_index,
            plan_value,
            members,
            weight_of_position,
            slot_of_position,
            source_index,
            sections.members,
            sections.wpos,
            sections.slot,
            n,
            k,
            num_rounds,
            group,
            blocks,
            index_stride,
            value_stride,
            layout.level_length,
            sections.source,
            sections.index,
            BLOCK=POSITION_BLOCK,
            num_warps=POSITION_WARPS,
        )
    return (
        members,
        weight_of_position,
        slot_of_position,
        pooled_scores,
        pooled_mask,
        source_index,
        plan_index,
        plan_value,
    )


def plan_backward(
    grad_weight_of_position: Tensor,
    grad_pooled_scores: Optional[Tensor],
    plan_index: Tensor,
    plan_value: Tensor,
    k: int,
    base: float,
    shared: Optional[tuple[int, int, _Sections]] = None,
    scorer: bool = False,
    dw: Optional[tuple[Tensor, Tensor]] = None,
) -> Optional[Tensor]:
    """Gradient of the scores (B×n float32) from those of weight_of_position (B×n) and pooled scores (B×k;
    None: zero). With ``shared`` = (B, n, sections), the plan and grad_weight_of_position are
    :func:`plan_forward`'s one workspace: dW at ``sections.scratch``, this function's work space after it.
    With ``scorer`` (score_pool) the bottom round writes the scorer logits' gradient and its block sums into
    the workspace instead of returning the scores' gradient. ``dw`` = (x, grad_values) with a single round:
    dW is computed by that round's kernel (not read from the workspace)."""
    sections = SEPARATE if shared is None else shared[2]
    batch, n = grad_weight_of_position.shape if shared is None else shared[:2]
    layout = _Layout(n, k)
    num_rounds, pairs = len(layout.new_widths), layout.pair_length
    index_stride, value_stride = layout.index_length, 2 * layout.level_length
    grad_wpos = grad_weight_of_position if shared else grad_weight_of_position.float().contiguous()
    grad_pooled = None if grad_pooled_scores is None else grad_pooled_scores.float().contiguous()
    grad_scores = None
    if not scorer:
        grad_scores = torch.empty(batch, n, dtype=torch.float32, device=plan_index.device)
    # per level above the input, indexed like the new slots of the round that made it: T, Q, A
    work_stride = 3 * pairs
    if shared:
        work, work_base = grad_wpos, sections.scratch + batch * n
    else:
        work, work_base = torch.empty(batch, 3 * pairs, dtype=torch.float32, device=plan_index.device), 0

    def subtree(r):  # T of level r: dW at the input, else the section written by round r - 1
        if r == 0:
            return grad_wpos, n, sections.scratch
        return work, work_stride, work_base + layout.pair_offsets[r - 1]

    def pair_args(r):
        blocks = triton.cdiv(layout.new_widths[r], PAIR_BLOCK)
        left = layout.level_length + layout.pair_offsets[r]
        return blocks, (layout.new_widths[r], blocks, index_stride, value_stride), (left, left + pairs)

    for r in range(num_rounds - 1):  # forward sweep: T of levels 1 .. R-1
        blocks, sizes, sides = pair_args(r)
        t_in, t_in_stride, t_in_offset = subtree(r)
        _launch(
            _plan_subtree,
            (batch * blocks,),
            plan_index,
            plan_value,
            t_in,
            work,
            *sizes,
            layout.level_length + layout.level_offsets[r],
            *sides,
            t_in_stride,
            t_in_offset,
            work_stride,
            work_base + layout.pair_offsets[r],
            sections.index,
            BLOCK=PAIR_BLOCK,
            num_warps=PAIR_WARPS,
        )
    log2_base, ln_base = math.log2(base), math.log(base)
    fused_dw = dw is not None and num_rounds == 1
    for r in reversed(range(num_rounds)):  # reverse sweep: Q and A of level r from level r + 1
        blocks, sizes, sides = pair_args(r)
        t_in, t_in_stride, t_in_offset = subtree(r)
        top, bottom = r == num_rounds - 1, r == 0
        if top:
            a_in, in_stride, q_in_offset, a_in_offset = grad_pooled, k, 0, 0
            if grad_pooled is None:  # stride 0: the kernel reads zeros
                a_in, in_stride = grad_wpos, 0
        else:
            a_in, in_stride = work, work_stride
            q_in_offset = work_base + pairs + layout.pair_offsets[r]
            a_in_offset = work_base + 2 * pairs + layout.pair_offsets[r]
        if bottom and scorer:
            out, out_stride, q_out_offset, a_out_offset = work, n, 0, sections.gc
        elif bottom:
            out, out_stride, q_out_offset, a_out_offset = grad_scores, n, 0, 0
        else:
            out, out_stride = work, work_stride
            q_out_offset = work_base + pairs + layout.pair_offsets[r - 1]
            a_out_offset = work_base + 2 * pairs + layout.pair_offsets[r - 1]
        _launch(
            _plan_reverse,
            (batch * blocks,),
            plan_index,
            plan_value,
            t_in,
            a_in,
            a_in,
            out,
            out,
            *sizes,
            layout.level_offsets[r],
            layout.level_length + layout.level_offsets[r],
            *sides,
            t_in_stride,
            t_in_offset,
            in_stride,
            q_in_offset,
            a_in_offset,
            out_stride,
            q_out_offset,
            a_out_offset,
            int(top),
            int(bottom),
            log2_base,
            ln_base,
            sections.gc_partial,
            *(dw if fused_dw else (plan_value, plan_value)),
            n,
            dw[0].size(2) if fused_dw else 1,
            sections.index,
            BLOCK=PAIR_BLOCK,
            SCORER=bottom and scorer,
            DW=fused_dw,
            MIX_DIM=MIX_COLUMNS_IN_PLAN,
            num_warps=MIX_WARPS_IN_PLAN if fused_dw else PAIR_WARPS,
        )
    return grad_scores


def mix_forward(
    x: Tensor,
    weight_of_position: Tensor,
    members: Tensor,
    k: int,
    sections: _Sections = SEPARATE,
    values: Optional[Tensor] = None,
) -> Tensor:
    """values[b, j] = Σ_g W[b, members[b, j, g]] · x[b, members[b, j, g]]  (B×n×d → B×k×d; dummy = n)."""
    batch, n, dim = x.shape
    group = _Layout(n, k).group
    if values is None:
        values = x.new_empty(batch, k, dim)
    block_dim = min(MIX_COLUMNS, triton.next_power_of_2(dim))
    grid = (triton.cdiv(batch * k, MIX_ROWS), triton.cdiv(dim, block_dim))
    _launch(
        _mix_forward,
        grid,
        x.contiguous(),
        weight_of_position,
        members,
        values,
        sections.wpos,
        sections.members,
        n,
        k,
        dim,
        group,
        batch * k,
        BLOCK_SLOTS=MIX_ROWS,
        BLOCK_DIM=block_dim,
    )
    return values


def mix_backward(
    grad_values: Tensor,
    x: Tensor,
    weight_of_position: Tensor,
    slot_of_position: Tensor,
    sections: _Sections = SEPARATE,
    grad_weight: Optional[Tensor] = None,
    write_grad_x: bool = True,
):
    """grad_x[p] = W(p)·grad_values[slot(p)] (B×n×d; None unless ``write_grad_x``) and grad_W[p] = <x[p],
    grad_values[slot(p)]> (B×n, or B·n entries of ``grad_weight`` from ``sections.scratch``)."""
    batch, n, dim = x.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if write_grad_x else None
    if grad_weight is None:
        grad_weight = weight_of_position.new_empty(batch, n)
    block_dim = min(MIX_COLUMNS, triton.next_power_of_2(dim))
    _launch(
        _mix_backward,
        (triton.cdiv(batch * n, MIX_ROWS),),
        x.contiguous(),
        grad_values.contiguous(),
        weight_of_position,
        slot_of_position,
        x if grad_x is None else grad_x,
        grad_weight,
        sections.wpos,
        sections.slot,
        sections.scratch,
        batch * n,
        dim,
        BLOCK_POSITIONS=MIX_ROWS,
        BLOCK_DIM=block_dim,
        WRITE_GRAD_X=write_grad_x,
    )
    return grad_x, grad_weight


class _TopK(torch.autograd.Function):
    """Eager autograd over the launchers: the plan and mix forward, the mix and plan backward."""

    @staticmethod
    def forward(ctx, x, scores, mask, k, base, flip_right, sort_back, rank_key=None):
        (
            members,
            weight_of_position,
            slot_of_position,
            pooled_scores,
            pooled_mask,
            source_index,
            plan_index,
            plan_value,
        ) = plan_forward(scores, mask, k, base, flip_right, sort_back, shared=True, rank_key=rank_key)
        ctx.sections = _workspace_sections(x.size(0), x.size(1), k)
        values = mix_forward(x, weight_of_position, members, k, ctx.sections)  # (one kernel: _TopK keeps the mix)
        ctx.k, ctx.base = k, base
        # weight_of_position, slot_of_position: the plan's own workspaces (shared=True)
        ctx.save_for_backward(x, plan_index, plan_value)
        ctx.mark_non_differentiable(pooled_mask, source_index)
        ctx.set_materialize_grads(False)  # no zero gradients built for the mask and source_index
        return values, pooled_scores, pooled_mask, source_index

    @staticmethod
    def backward(ctx, grad_values, grad_pooled_scores, _grad_mask, _grad_source):
        x, plan_index, plan_value = ctx.saved_tensors
        batch, n = x.shape[:2]
        if grad_values is None:
            grad_values = x.new_zeros(batch, ctx.k, x.size(2))
        grad_x, _ = mix_backward(grad_values, x, plan_value, plan_index, ctx.sections, plan_value)
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = plan_backward(
                plan_value, grad_pooled_scores, plan_index, plan_value, ctx.k, ctx.base, (batch, n, ctx.sections)
            )
        return (grad_x if ctx.needs_input_grad[0] else None), grad_scores, None, None, None, None, None, None


class Statistics:
    """score_pool's statistics, in its workspaces until read (a training step reads none: nothing is
    dispatched for them). Each read makes a view (no gradient)."""

    def __init__(self, workspace: Tensor, sections: _Sections, batch: int, n: int, k: int):
        self._value, self._sections, self._shape = workspace, sections, (batch, n, k)

    @property
    def scores(self) -> Tensor:
        """B×n float32, the scorer's scores σ(logit [- mean]) + 1e-5 (padding: 0)."""
        batch, n, _ = self._shape
        return self._value.as_strided((batch, n), (n, 1), self._sections.scores)

    @property
    def pooled_scores(self) -> Tensor:
        """B×k float32."""
        batch, _, k = self._shape
        return self._value.as_strided((batch, k), (k, 1), self._sections.pooled)

    @property
    def source_index(self) -> Tensor:
        """B×k int64, the input position dominating each slot."""
        batch, _, k = self._shape
        return self._value.as_strided((batch, k), (k, 1), self._sections.source).long()


class _ScorePool(torch.autograd.Function):
    """score_pool: the scorer and the top-k in one autograd node (eager, Triton); one float32 and one int32
    workspace hold the plan, the statistics and the backward's scratch.

    Forward: _score_forward (logits, ranking key, block sums), the round-0 sort, _plan_round with the
    scorer's centring and sigmoid inside, [later rounds, _plan_compose], _mix_forward. Backward: _mix_backward
    (dW only), the plan's backward with the sigmoid's inside its bottom round, then _score_backward (centring's
    backward, grad_x, per-program Σ g·x); the weight's gradient is the sum of those rows.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, k, base, flip_right, sort_back, centre):
        batch, n, dim = x.shape
        x = x.contiguous()
        values = x.new_empty(batch, k, dim)
        plan = plan_forward(
            None, mask, k, base, flip_right, sort_back, shared=True, scorer=(x, weight, bias, centre), mix=(x, values)
        )
        pooled_mask, plan_index, plan_value = plan[4], plan[6], plan[7]
        ctx.sections = sections = _workspace_sections(batch, n, k, dim)
        ctx.single_round = len(round_widths(n, k)) == 1
        if not ctx.single_round:  # (one round: _plan_round mixed)
            mix_forward(x, plan_value, plan_index, k, sections, values)
        ctx.k, ctx.base, ctx.centre = k, base, centre
        ctx.save_for_backward(x, weight, plan_index, plan_value)
        ctx.mark_non_differentiable(pooled_mask)
        ctx.set_materialize_grads(False)
        return values, pooled_mask, Statistics(plan_value, sections, batch, n, k)

    @staticmethod
    def backward(ctx, grad_values, _grad_mask, _grad_statistics):
        x, weight, plan_index, plan_value = ctx.saved_tensors
        batch, n, dim = x.shape
        sections = ctx.sections
        if grad_values is None:
            grad_values = x.new_zeros(batch, ctx.k, dim)
        grad_values = grad_values.contiguous()
        if not ctx.single_round:  # (one round: _plan_reverse takes dW itself)
            mix_backward(grad_values, x, plan_value, plan_index, sections, plan_value, write_grad_x=False)
        plan_backward(
            plan_value, None, plan_index, plan_value, ctx.k, ctx.base, (batch, n, sections), True, (x, grad_values)
        )
        needs_weight, needs_bias = ctx.needs_input_grad[1:3]
        grad_x = torch.empty_like(x)
        blocks = triton.cdiv(n, SCORE_POSITIONS)
        _launch(
            _score_backward,
            (batch * blocks,),
            x,
            weight,
            grad_values,
            plan_value,
            plan_index,
            grad_x,
            2 * _Layout(n, ctx.k).level_length,
            sections.partial,
            sections.wpos,
            sections.slot,
            sections.gc,
            sections.gc_partial,
            sections.pair_blocks,
            sections.weight_grad,
            n,
            dim,
            blocks,
            int(needs_weight or needs_bias),
            BLOCK_POSITIONS=SCORE_POSITIONS,
            BLOCK_DIM=SCORE_COLUMNS,
            CENTRE=bool(ctx.centre),
            num_warps=SCORE_WARPS,
        )
        grad_weight = grad_bias = None
        if needs_weight:  # Σ over the programs' rows: 1×d
            rows = plan_value.as_strided((sections.programs, dim), (dim + 1, 1), sections.weight_grad)
            grad_weight = rows.sum(0, keepdim=True, dtype=weight.dtype)  # (one operator in bf16 too)
        if needs_bias:
            rows = plan_value.as_strided((sections.programs, 1), (dim + 1, 1), sections.weight_grad + dim)
            grad_bias = rows.sum(0, dtype=weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def score_pool(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    mask: Tensor,
    k: int,
    base: float,
    flip_right: bool,
    sort_back: bool,
    centre: bool,
) -> tuple[Tensor, Tensor, Statistics]:
    """The scorer (x·w [+ b], centred over the real positions when ``centre``, σ + 1e-5) and the Triton top-k
    in one operator (eager): x B×n×d, weight 1×d, bias (1,) or None, mask B×n bool, k < n. The first round
    ranks by the logits.

    Returns values B×k×d, the pooled mask B×k and the :class:`Statistics` (scores, pooled scores,
    source_index: made when read, without gradient).
    """
    return _ScorePool.apply(x, weight, bias, mask, k, base, flip_right, sort_back, centre)


# ------------------------------------------------------------------------------------------- custom ops
# The same launchers as torch custom ops, for torch.compile: dynamo cannot trace a Triton launch, but it
# records a custom op (shapes from the fake implementation) and its registered autograd. Eager calls use
# _TopK instead: a custom op's Python dispatch costs several times an autograd.Function's per call.
# Registered for every device; CPU tensors need the interpreter (tests).

if AVAILABLE:

    @torch.library.custom_op("pyramidion::topk_plan", mutates_args=())
    def topk_plan(
        scores: Tensor,
        mask: Tensor,
        k: int,
        base: float,
        flip_right: bool,
        sort_back: bool,
        rank_key: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:func:`plan_forward` as a custom op."""
        return plan_forward(scores, mask, k, base, flip_right, sort_back, rank_key=rank_key)

    @topk_plan.register_fake
    def _(scores, mask, k, base, flip_right, sort_back, rank_key=None):
        batch, n = scores.shape
        layout = _Layout(n, k)
        group = layout.group
        new = scores.new_empty
        return (
            new(batch, k, group, dtype=torch.int32),
            new(batch, n, dtype=torch.float32),
            new(batch, n, dtype=torch.int32),
            new(batch, k, dtype=torch.float32),
            new(batch, k, dtype=torch.bool),
            new(batch, k, dtype=torch.int64),
            new(batch, layout.index_length, dtype=torch.int32),
            new(batch, 2 * layout.level_length, dtype=torch.float32),
        )

    @torch.library.custom_op("pyramidion::topk_plan_backward", mutates_args=())
    def topk_plan_backward(
        grad_weight_of_position: Tensor,
        grad_pooled_scores: Tensor,
        plan_index: Tensor,
        plan_value: Tensor,
        k: int,
        base: float,
    ) -> Tensor:
        """:func:`plan_backward` as a custom op."""
        return plan_backward(grad_weight_of_position, grad_pooled_scores, plan_index, plan_value, k, base)

    @topk_plan_backward.register_fake
    def _(grad_weight_of_position, grad_pooled_scores, plan_index, plan_value, k, base):
        return grad_weight_of_position.new_empty(grad_weight_of_position.shape, dtype=torch.float32)

    def _plan_setup_context(ctx, inputs, output):
        scores, mask, k, base, flip_right, sort_back, _rank_key = inputs
        ctx.n, ctx.k, ctx.base = scores.size(1), k, base
        ctx.save_for_backward(output[6], output[7])
        ctx.mark_non_differentiable(*(output[i] for i in (0, 2, 4, 5, 6, 7)))

    def _plan_backward_autograd(
        ctx,
        grad_members,
        grad_weight_of_position,
        grad_slot,
        grad_pooled_scores,
        grad_pooled_mask,
        grad_source,
        grad_plan_index,
        grad_plan_value,
    ):
        plan_index, plan_value = ctx.saved_tensors
        batch = plan_index.size(0)
        if grad_weight_of_position is None:
            grad_weight_of_position = plan_value.new_zeros(batch, ctx.n)
        if grad_pooled_scores is None:
            grad_pooled_scores = plan_value.new_zeros(batch, ctx.k)
        grad_scores = topk_plan_backward(
            grad_weight_of_position, grad_pooled_scores, plan_index, plan_value, ctx.k, ctx.base
        )
        return grad_scores, None, None, None, None, None, None

    topk_plan.register_autograd(_plan_backward_autograd, setup_context=_plan_setup_context)

    @torch.library.custom_op("pyramidion::topk_mix", mutates_args=())
    def topk_mix(x: Tensor, weight_of_position: Tensor, members: Tensor, slot_of_position: Tensor) -> Tensor:
        """:func:`mix_forward` as a custom op (slot_of_position is kept for the backward)."""
        return mix_forward(x, weight_of_position, members, members.size(1))

    @topk_mix.register_fake
    def _(x, weight_of_position, members, slot_of_position):
        return x.new_empty(x.size(0), members.size(1), x.size(2))

    @torch.library.custom_op("pyramidion::topk_mix_backward", mutates_args=())
    def topk_mix_backward(
        grad_values: Tensor, x: Tensor, weight_of_position: Tensor, slot_of_position: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:func:`mix_backward` as a custom op."""
        return mix_backward(grad_values, x, weight_of_position, slot_of_position)

    @topk_mix_backward.register_fake
    def _(grad_values, x, weight_of_position, slot_of_position):
        return torch.empty_like(x, memory_format=torch.contiguous_format), weight_of_position.new_empty(
            weight_of_position.shape
        )

    def _mix_setup_context(ctx, inputs, output):
        x, weight_of_position, members, slot_of_position = inputs
        ctx.save_for_backward(x, weight_of_position, slot_of_position)

    def _mix_backward_autograd(ctx, grad_values):
        x, weight_of_position, slot_of_position = ctx.saved_tensors
        grad_x, grad_weight = topk_mix_backward(grad_values, x, weight_of_position, slot_of_position)
        return grad_x, grad_weight, None, None

    topk_mix.register_autograd(_mix_backward_autograd, setup_context=_mix_setup_context)


def pool(
    x: Tensor,
    scores: Tensor,
    mask: Tensor,
    k: int,
    base: float,
    flip_right: bool,
    sort_back: bool,
    rank_key: Optional[Tensor] = None,
):
    """The Triton path of the top-k: x B×n×d, scores B×n float32 (padding read as 0, no gradient), mask B×n
    bool, k < n; ``rank_key`` (B×n) ranks the first round instead of the scores.

    Returns (values B×k×d, pooled scores B×k, pooled mask B×k, source_index B×k), like the torch path.
    """
    if not torch.compiler.is_compiling():
        return _TopK.apply(x, scores, mask, k, base, flip_right, sort_back, rank_key)
    members, weight_of_position, slot_of_position, pooled_scores, pooled_mask, source_index, _, _ = topk_plan(
        scores, mask, k, base, flip_right, sort_back, rank_key
    )
    values = topk_mix(x, weight_of_position, members, slot_of_position)
    return values, pooled_scores, pooled_mask, source_index
