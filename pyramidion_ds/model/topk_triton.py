"""Successive-halving top-k in four Triton kernels (two forward, two backward).

The same operator as :func:`pyramidion_ds.model.topk.successive_halving_topk` (see that module for the
rounds), computed so that the B×n×d tensor is read once forward and once backward::

    forward                                          backward
    scores B×n, mask B×n                             grad_values B×k×d, x B×n×d
      │ _plan_forward (1 program per row: all rounds)  │ _mix_backward (blocks of positions × d)
      │   reads  scores, mask                          │   reads  grad_values[slot(p)], x[p], W(p)
      │   writes members B×k×G, W(p) B×n,              │   writes grad_x[p] = W(p)·grad_values[slot(p)]
      │          slot(p) B×n, pooled scores/mask B×k,  │          dW[p] = <x[p], grad_values[slot(p)]>
      │          source_index B×k, plan (per round:    ▼
      │          new slot, partner, pair weight,      dW B×n, grad_pooled_scores B×k
      │          slot score, slot mask)                │ _plan_backward (1 program per row: rounds
      ▼                                                │   forward for subtree sums, then in reverse)
    x B×n×d                                            │   reads  plan;  writes grad_scores B×n
      │ _mix_forward (blocks of slots × d)             ▼
      │   values[j] = Σ_g W(members[j, g]) · x[members[j, g]]
      ▼
    values B×k×d

One round inside ``_plan_forward``, width w → m: each slot gets a packed int64 key (score descending,
ties and padding by position, exactly the torch path's stable argsort) and one ``tl.sort`` orders the
row; ranks are scattered to a per-row scratch row, each slot reads its partner's rank, score and mask
there, computes its pair weight, and the left member writes the new slot's score and mask. Every input
position follows its slot (new slot, weight product, left/right bit per round), so at the end the
member table B×k×G (G = 2**rounds, entry g's bit r = right member in round r, dummy = n) is one scatter.
Work is exchanged between a program's threads through global scratch with ``tl.debug_barrier()``.

The backward of the rounds needs no division by weights: with T(c) = Σ_{p in c} dW[p]·(weight of p
inside c) swept forward and Q(c) = product of c's later pair weights swept back, the gradient into a
pair weight is Q·T + grad_score·score, then the two-way softmax and d(base**s)/ds = ln(base)·base**s.

Eager calls run them from one autograd.Function; under torch.compile they are torch custom ops (fake
shapes, registered autograd), so dynamo traces through without a graph break. Kernels run compiled on
CUDA tensors, or on CPU tensors through Triton's interpreter when the process imported triton with
``TRITON_INTERPRET=1`` (tests compare them with the torch path there). ``triton`` is imported
guardedly: :data:`AVAILABLE` is False without it.
"""

from __future__ import annotations

import functools
import math

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


def plan_length(n: int, k: int) -> int:
    """Entries per row of the saved plan: one section per width, input width included (n, w1, ..., k)."""
    return n + sum(round_widths(n, k))


# ----------------------------------------------------------------------------------------------- kernels
# Plain functions made kernels by _kernel() on first launch (triton.jit: compiled, or with TRITON_INTERPRET=1
# at triton's import, interpreted on CPU tensors).


def _plan_forward(
    scores_ptr,
    mask_ptr,
    members_ptr,
    wpos_ptr,
    slot_ptr,
    pooled_scores_ptr,
    pooled_mask_ptr,
    source_ptr,
    plan_index_ptr,
    plan_value_ptr,
    scratch_ptr,
    n,
    k,
    num_rounds,
    group,
    plan_len,
    log2_base,
    FLIP: tl.constexpr,
    SORT_BACK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    in_row = idx < n
    # plan of this row: index rows (new slot, partner code, mask) and value rows (pair weight, score)
    plan_slot = plan_index_ptr + row * 3 * plan_len
    plan_partner = plan_slot + plan_len
    plan_mask = plan_slot + 2 * plan_len
    plan_weight = plan_value_ptr + row * 2 * plan_len
    plan_score = plan_weight + plan_len
    order_ptr = scratch_ptr + row * 2 * BLOCK
    rank_ptr = order_ptr + BLOCK

    real = tl.load(mask_ptr + row * n + idx, mask=in_row, other=0) != 0
    score = tl.where(real, tl.load(scores_ptr + row * n + idx, mask=in_row, other=0.0).to(tl.float32), 0.0)
    tl.store(plan_score + idx, score, mask=in_row)
    tl.store(plan_mask + idx, real.to(tl.int32), mask=in_row)
    # every input position follows its slot: slot index, weight product, left/right bits
    pos_slot = idx
    pos_weight = tl.full([BLOCK], 1.0, tl.float32)
    pos_group = tl.zeros([BLOCK], tl.int32)
    width = n
    offset = 0
    for r in range(num_rounds):
        new_width = tl.maximum(k, (width + 1) // 2)
        num_pass = 2 * new_width - width
        live = idx < width
        tl.debug_barrier()
        if r > 0:
            score = tl.load(plan_score + offset + idx, mask=live, other=0.0)
            real = tl.load(plan_mask + offset + idx, mask=live, other=0) != 0
        # rank: real slots by score descending, then padding, then the block's tail; ties by position
        bits = (score + 0.0).to(tl.int32, bitcast=True)  # + 0.0 makes -0.0 equal to 0.0
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        high = tl.where(real, -ordered, 2147483649)
        high = tl.where(live, high, 2147483650)
        key = tl.sort(high * 16777216 + idx.to(tl.int64))
        order = (key & 16777215).to(tl.int32)
        tl.store(order_ptr + idx, order)
        tl.store(rank_ptr + order, idx)
        tl.debug_barrier()
        rank = tl.load(rank_ptr + idx)
        is_top = rank < new_width
        paired = live & (rank >= num_pass)
        pair_top = rank - num_pass
        if FLIP:
            partner_rank = tl.where(is_top, width - 1 - pair_top, num_pass + width - 1 - rank)
        else:
            partner_rank = tl.where(is_top, new_width + pair_top, rank - new_width + num_pass)
        partner = tl.load(order_ptr + partner_rank, mask=paired, other=0)
        partner_score = tl.load(plan_score + offset + partner, mask=paired, other=0.0)
        partner_real = tl.load(plan_mask + offset + partner, mask=paired, other=0) != 0
        logit = tl.where(real, tl.exp2(score * log2_base), -1.0e4)  # -1.0e4: PAD_LOGIT
        partner_logit = tl.where(partner_real, tl.exp2(partner_score * log2_base), -1.0e4)
        top_logit = tl.maximum(logit, partner_logit)
        e_self = tl.exp(logit - top_logit)
        e_partner = tl.exp(partner_logit - top_logit)
        left_first = tl.where(is_top, e_self + e_partner, e_partner + e_self)
        weight = tl.where(paired, e_self / left_first, 1.0)
        partner_weight = tl.where(paired, e_partner / left_first, 0.0)
        # new slot: the rank of the pair's left member, or with sort_back its place in document order
        if SORT_BACK:
            top_slot = tl.cumsum(is_top.to(tl.int32), axis=0) - 1
        else:
            top_slot = rank
        tl.store(plan_slot + offset + idx, top_slot, mask=live & is_top)
        tl.debug_barrier()
        new_slot = tl.where(is_top, top_slot, tl.load(plan_slot + offset + partner, mask=live & ~is_top, other=0))
        tl.store(plan_slot + offset + idx, new_slot, mask=live & ~is_top)
        partner_code = tl.where(paired, tl.where(is_top, partner, -2 - partner), -1)
        tl.store(plan_partner + offset + idx, partner_code, mask=live)
        tl.store(plan_weight + offset + idx, weight, mask=live)
        # the left member writes the new slot: score w_L·s_L + w_R·s_R, mask any
        next_offset = offset + width
        new_score = tl.where(paired, score * weight + partner_score * partner_weight, score)
        tl.store(plan_score + next_offset + new_slot, new_score, mask=live & is_top)
        tl.store(plan_mask + next_offset + new_slot, (real | (paired & partner_real)).to(tl.int32), mask=live & is_top)
        tl.debug_barrier()
        # positions follow their slot
        slot_rank = tl.load(rank_ptr + pos_slot, mask=in_row, other=0)
        pos_weight = pos_weight * tl.load(plan_weight + offset + pos_slot, mask=in_row, other=0.0)
        pos_group = pos_group | ((slot_rank >= new_width).to(tl.int32) << r)
        pos_slot = tl.load(plan_slot + offset + pos_slot, mask=in_row, other=0)
        offset = next_offset
        width = new_width
    tl.debug_barrier()
    out = idx < k
    tl.store(pooled_scores_ptr + row * k + idx, tl.load(plan_score + offset + idx, mask=out, other=0.0), mask=out)
    tl.store(pooled_mask_ptr + row * k + idx, tl.load(plan_mask + offset + idx, mask=out, other=0) != 0, mask=out)
    # member table: dummies (never written by a position) hold n
    row_members = members_ptr + row * k * group
    for start in range(0, k * group, BLOCK):
        tl.store(row_members + start + idx, tl.full([BLOCK], 0, tl.int32) + n, mask=start + idx < k * group)
    tl.debug_barrier()
    tl.store(row_members + pos_slot * group + pos_group, idx, mask=in_row)
    tl.store(wpos_ptr + row * n + idx, pos_weight, mask=in_row)
    tl.store(slot_ptr + row * n + idx, (row * k + pos_slot).to(tl.int32), mask=in_row)
    tl.store(source_ptr + row * k + pos_slot, idx.to(tl.int64), mask=in_row & (pos_group == 0))


def _plan_backward(
    grad_wpos_ptr,
    grad_pooled_ptr,
    plan_index_ptr,
    plan_value_ptr,
    work_ptr,
    grad_scores_ptr,
    n,
    k,
    num_rounds,
    plan_len,
    log2_base,
    ln_base,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    plan_slot = plan_index_ptr + row * 3 * plan_len
    plan_partner = plan_slot + plan_len
    plan_mask = plan_slot + 2 * plan_len
    plan_weight = plan_value_ptr + row * 2 * plan_len
    plan_score = plan_weight + plan_len
    # per section: T (subtree sum of dW times weight inside the slot), Q (later weights), A (grad of score)
    subtree = work_ptr + row * 3 * plan_len
    later = subtree + plan_len
    adjoint = subtree + 2 * plan_len
    tl.store(subtree + idx, tl.load(grad_wpos_ptr + row * n + idx, mask=idx < n, other=0.0), mask=idx < n)
    width = n
    offset = 0
    for _r in range(num_rounds):  # forward sweep: T of every section
        new_width = tl.maximum(k, (width + 1) // 2)
        live = idx < width
        tl.debug_barrier()
        code = tl.load(plan_partner + offset + idx, mask=live, other=-1)
        left = live & (code >= -1)
        paired = left & (code >= 0)
        new_slot = tl.load(plan_slot + offset + idx, mask=left, other=0)
        value = tl.load(plan_weight + offset + idx, mask=left, other=0.0) * tl.load(
            subtree + offset + idx, mask=left, other=0.0
        )
        partner = tl.where(paired, code, 0)
        value += tl.load(plan_weight + offset + partner, mask=paired, other=0.0) * tl.load(
            subtree + offset + partner, mask=paired, other=0.0
        )
        tl.store(subtree + offset + width + new_slot, value, mask=left)
        offset += width
        width = new_width
    out = idx < k
    tl.store(later + offset + idx, tl.full([BLOCK], 1.0, tl.float32), mask=out)
    tl.store(adjoint + offset + idx, tl.load(grad_pooled_ptr + row * k + idx, mask=out, other=0.0), mask=out)
    for back in range(num_rounds):  # reverse sweep, round num_rounds-1 down to 0
        r = num_rounds - 1 - back
        width = n
        offset = 0
        for _ in range(r):
            offset += width
            width = tl.maximum(k, (width + 1) // 2)
        live = idx < width
        tl.debug_barrier()
        code = tl.load(plan_partner + offset + idx, mask=live, other=-1)
        paired = live & (code != -1)
        partner = tl.where(code >= 0, code, -2 - code)
        partner = tl.where(paired, partner, 0)
        new_slot = tl.load(plan_slot + offset + idx, mask=live, other=0)
        next_q = tl.load(later + offset + width + new_slot, mask=live, other=0.0)
        next_a = tl.load(adjoint + offset + width + new_slot, mask=live, other=0.0)
        weight = tl.load(plan_weight + offset + idx, mask=live, other=0.0)
        score = tl.load(plan_score + offset + idx, mask=live, other=0.0)
        real = tl.load(plan_mask + offset + idx, mask=live, other=0) != 0
        partner_weight = tl.load(plan_weight + offset + partner, mask=paired, other=0.0)
        partner_score = tl.load(plan_score + offset + partner, mask=paired, other=0.0)
        grad_self = next_q * tl.load(subtree + offset + idx, mask=live, other=0.0) + next_a * score
        grad_partner = next_q * tl.load(subtree + offset + partner, mask=paired, other=0.0) + next_a * partner_score
        # softmax backward over the pair, as torch writes it: w_i (g_i - Σ_j w_j g_j)
        left_first = tl.where(
            code >= 0,
            weight * grad_self + partner_weight * grad_partner,
            partner_weight * grad_partner + weight * grad_self,
        )
        grad_logit = tl.where(paired, weight * (grad_self - left_first), 0.0)
        logit = tl.exp2(score * log2_base)
        grad_score = next_a * weight + tl.where(real, grad_logit * (logit * ln_base), 0.0)
        tl.store(adjoint + offset + idx, grad_score, mask=live)
        tl.store(later + offset + idx, weight * next_q, mask=live)
    tl.debug_barrier()
    in_row = idx < n
    real = tl.load(plan_mask + idx, mask=in_row, other=0) != 0
    grad = tl.where(real, tl.load(adjoint + idx, mask=in_row, other=0.0), 0.0)
    tl.store(grad_scores_ptr + row * n + idx, grad, mask=in_row)


def _mix_forward(
    x_ptr,
    wpos_ptr,
    members_ptr,
    values_ptr,
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
        member = tl.load(members_ptr + slots * group + g, mask=valid, other=0)
        real = valid & (member < n)
        position = row_start + member
        weight = tl.load(wpos_ptr + position, mask=real, other=0.0)
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
    total_positions,
    dim,
    BLOCK_POSITIONS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    positions = tl.program_id(0).to(tl.int64) * BLOCK_POSITIONS + tl.arange(0, BLOCK_POSITIONS)
    valid = positions < total_positions
    slot = tl.load(slot_ptr + positions, mask=valid, other=0).to(tl.int64)
    weight = tl.load(wpos_ptr + positions, mask=valid, other=0.0)
    dot = tl.zeros([BLOCK_POSITIONS], tl.float32)
    for start in range(0, dim, BLOCK_DIM):
        cols = start + tl.arange(0, BLOCK_DIM)
        ok = valid[:, None] & (cols < dim)[None, :]
        grad_rows = tl.load(grad_values_ptr + slot[:, None] * dim + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rows = tl.load(x_ptr + positions[:, None] * dim + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(
            grad_x_ptr + positions[:, None] * dim + cols[None, :],
            (weight[:, None] * grad_rows).to(grad_x_ptr.dtype.element_ty),
            mask=ok,
        )
        dot += tl.sum(grad_rows * rows, axis=1)
    tl.store(grad_wpos_ptr + positions, dot, mask=valid)


@functools.cache
def _kernel(fn):
    return triton.jit(fn)


def interpreted() -> bool:
    """Whether triton was imported with ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors)."""
    return AVAILABLE and type(tl.zeros).__name__ == "InterpretedFunction"


def _launch(fn, grid, *args, **meta):
    global launch_count, launching
    if not args[0].is_cuda and not interpreted():
        raise RuntimeError(
            "the Triton top-k kernels take CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported"
        )
    launch_count += 1
    launching = True  # the interpreter runs torch operators of its own; counters skip those
    try:
        _kernel(fn)[grid](*args, **meta)
    finally:
        launching = False


def _row_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _row_warps(block: int) -> int:
    """Warps for a one-row program: ~16 lanes per thread. Compiled for sm_90 (no GPU needed), the forward
    plan at 8192 lanes takes 255 registers and spills 936 B with 8 warps, 128 and 584 B with 16."""
    return max(4, min(32, block // 512))


#: mix tiles: rows (slots or positions) × columns of d per program; 8×128 over 4 warps is one 16-byte
#: vector per thread: 78 / 56 registers (forward / backward) compiled for sm_90, against 222 / 255 with
#: spills at 32×128
MIX_ROWS, MIX_COLUMNS = 8, 128


# ------------------------------------------------------------------------------------------- launchers


def plan_forward(scores: Tensor, mask: Tensor, k: int, base: float, flip_right: bool, sort_back: bool):
    """The rounds on scores. scores: B×n float32 (padding entries are read as 0), mask: B×n bool.

    Returns members B×k×G int32 (dummy = n), weight_of_position B×n float32, slot_of_position B×n int32
    (flat b·k + slot), pooled scores B×k float32, pooled mask B×k bool, source_index B×k int64, and the
    saved plan: index B×3×L int32 and values B×2×L float32 (L = :func:`plan_length`).
    """
    batch, n = scores.shape
    if n >= 2**24:
        raise ValueError(f"Triton top-k: at most 2**24 positions per row, got {n}")
    num_rounds = len(round_widths(n, k))
    group, length, block = 2**num_rounds, plan_length(n, k), _row_block(n)
    device = scores.device
    members = torch.empty(batch, k, group, dtype=torch.int32, device=device)
    weight_of_position = torch.empty(batch, n, dtype=torch.float32, device=device)
    slot_of_position = torch.empty(batch, n, dtype=torch.int32, device=device)
    pooled_scores = torch.empty(batch, k, dtype=torch.float32, device=device)
    pooled_mask = torch.empty(batch, k, dtype=torch.bool, device=device)
    source_index = torch.empty(batch, k, dtype=torch.int64, device=device)
    plan_index = torch.empty(batch, 3, length, dtype=torch.int32, device=device)
    plan_value = torch.empty(batch, 2, length, dtype=torch.float32, device=device)
    scratch = torch.empty(batch, 2, block, dtype=torch.int32, device=device)
    _launch(
        _plan_forward,
        (batch,),
        scores.contiguous(),
        mask.contiguous(),
        members,
        weight_of_position,
        slot_of_position,
        pooled_scores,
        pooled_mask,
        source_index,
        plan_index,
        plan_value,
        scratch,
        n,
        k,
        num_rounds,
        group,
        length,
        math.log2(base),
        FLIP=flip_right,
        SORT_BACK=sort_back,
        BLOCK=block,
        num_warps=_row_warps(block),
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
    grad_pooled_scores: Tensor,
    plan_index: Tensor,
    plan_value: Tensor,
    k: int,
    base: float,
) -> Tensor:
    """Gradient of the scores (B×n float32) from those of weight_of_position (B×n) and pooled scores (B×k)."""
    batch, n = grad_weight_of_position.shape
    length, block = plan_index.size(2), _row_block(n)
    grad_scores = torch.empty(batch, n, dtype=torch.float32, device=plan_index.device)
    work = torch.empty(batch, 3, length, dtype=torch.float32, device=plan_index.device)
    _launch(
        _plan_backward,
        (batch,),
        grad_weight_of_position.float().contiguous(),
        grad_pooled_scores.float().contiguous(),
        plan_index,
        plan_value,
        work,
        grad_scores,
        n,
        k,
        len(round_widths(n, k)),
        length,
        math.log2(base),
        math.log(base),
        BLOCK=block,
        num_warps=_row_warps(block),
    )
    return grad_scores


def mix_forward(x: Tensor, weight_of_position: Tensor, members: Tensor) -> Tensor:
    """values[b, j] = Σ_g W[b, members[b, j, g]] · x[b, members[b, j, g]]  (B×n×d → B×k×d; dummy = n)."""
    batch, n, dim = x.shape
    k, group = members.shape[1:]
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
        n,
        k,
        dim,
        group,
        batch * k,
        BLOCK_SLOTS=MIX_ROWS,
        BLOCK_DIM=block_dim,
    )
    return values


def mix_backward(grad_values: Tensor, x: Tensor, weight_of_position: Tensor, slot_of_position: Tensor):
    """grad_x[p] = W(p)·grad_values[slot(p)] (B×n×d) and grad_W[p] = <x[p], grad_values[slot(p)]> (B×n)."""
    batch, n, dim = x.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_weight = weight_of_position.new_empty(batch, n)
    block_dim = min(MIX_COLUMNS, triton.next_power_of_2(dim))
    _launch(
        _mix_backward,
        (triton.cdiv(batch * n, MIX_ROWS),),
        x.contiguous(),
        grad_values.contiguous(),
        weight_of_position,
        slot_of_position,
        grad_x,
        grad_weight,
        batch * n,
        dim,
        BLOCK_POSITIONS=MIX_ROWS,
        BLOCK_DIM=block_dim,
    )
    return grad_x, grad_weight


class _TopK(torch.autograd.Function):
    """Eager autograd over the launchers: two launches forward, two backward, little Python between."""

    @staticmethod
    def forward(ctx, x, scores, mask, k, base, flip_right, sort_back):
        (
            members,
            weight_of_position,
            slot_of_position,
            pooled_scores,
            pooled_mask,
            source_index,
            plan_index,
            plan_value,
        ) = plan_forward(scores, mask, k, base, flip_right, sort_back)
        values = mix_forward(x, weight_of_position, members)
        ctx.k, ctx.base = k, base
        ctx.save_for_backward(x, weight_of_position, slot_of_position, plan_index, plan_value)
        ctx.mark_non_differentiable(pooled_mask, source_index)
        ctx.set_materialize_grads(False)  # no zero gradients built for the mask and source_index
        return values, pooled_scores, pooled_mask, source_index

    @staticmethod
    def backward(ctx, grad_values, grad_pooled_scores, _grad_mask, _grad_source):
        x, weight_of_position, slot_of_position, plan_index, plan_value = ctx.saved_tensors
        if grad_values is None:
            grad_values = x.new_zeros(x.size(0), ctx.k, x.size(2))
        if grad_pooled_scores is None:
            grad_pooled_scores = plan_index.new_zeros(x.size(0), ctx.k, dtype=torch.float32)
        grad_x, grad_weight = mix_backward(grad_values, x, weight_of_position, slot_of_position)
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = plan_backward(grad_weight, grad_pooled_scores, plan_index, plan_value, ctx.k, ctx.base)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_scores, None, None, None, None, None


# ------------------------------------------------------------------------------------------- custom ops
# The same launchers as torch custom ops, for torch.compile: dynamo cannot trace a Triton launch, but it
# records a custom op (shapes from the fake implementation) and its registered autograd. Eager calls use
# _TopK instead: a custom op's Python dispatch costs several times an autograd.Function's per call.
# Registered for every device; CPU tensors need the interpreter (tests).

if AVAILABLE:

    @torch.library.custom_op("pyramidion::topk_plan", mutates_args=())
    def topk_plan(
        scores: Tensor, mask: Tensor, k: int, base: float, flip_right: bool, sort_back: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:func:`plan_forward` as a custom op."""
        return plan_forward(scores, mask, k, base, flip_right, sort_back)

    @topk_plan.register_fake
    def _(scores, mask, k, base, flip_right, sort_back):
        batch, n = scores.shape
        group, length = 2 ** len(round_widths(n, k)), plan_length(n, k)
        new = scores.new_empty
        return (
            new(batch, k, group, dtype=torch.int32),
            new(batch, n, dtype=torch.float32),
            new(batch, n, dtype=torch.int32),
            new(batch, k, dtype=torch.float32),
            new(batch, k, dtype=torch.bool),
            new(batch, k, dtype=torch.int64),
            new(batch, 3, length, dtype=torch.int32),
            new(batch, 2, length, dtype=torch.float32),
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
        scores, mask, k, base, flip_right, sort_back = inputs
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
        return grad_scores, None, None, None, None, None

    topk_plan.register_autograd(_plan_backward_autograd, setup_context=_plan_setup_context)

    @torch.library.custom_op("pyramidion::topk_mix", mutates_args=())
    def topk_mix(x: Tensor, weight_of_position: Tensor, members: Tensor, slot_of_position: Tensor) -> Tensor:
        """:func:`mix_forward` as a custom op (slot_of_position is kept for the backward)."""
        return mix_forward(x, weight_of_position, members)

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


def pool(x: Tensor, scores: Tensor, mask: Tensor, k: int, base: float, flip_right: bool, sort_back: bool):
    """The Triton path of the top-k: x B×n×d, scores B×n float32 (padding read as 0, no gradient), mask B×n
    bool, k < n.

    Returns (values B×k×d, pooled scores B×k, pooled mask B×k, source_index B×k), like the torch path.
    """
    if not torch.compiler.is_compiling():
        return _TopK.apply(x, scores, mask, k, base, flip_right, sort_back)
    members, weight_of_position, slot_of_position, pooled_scores, pooled_mask, source_index, _, _ = topk_plan(
        scores, mask, k, base, flip_right, sort_back
    )
    values = topk_mix(x, weight_of_position, members, slot_of_position)
    return values, pooled_scores, pooled_mask, source_index
