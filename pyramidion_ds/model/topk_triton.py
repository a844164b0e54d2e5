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

Eager calls run them from one autograd.Function, with two flat workspaces (int32: plan index, member table,
slots; float32: plan values, W) and one backward scratch instead of a tensor each (fewer host operations per
call; the kernels take each section's offset); under torch.compile they are torch custom ops (fake
shapes, registered autograd), so dynamo traces through without a graph break. Kernels run compiled on
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
#: the largest index the kernels hold in int32: flat slots b·k + j and positions b·n + p, entries of the member
#: table, offsets inside one row of the saved plan (< 4n)
MAX_ELEMENTS = 2**31 - 1


def supports(batch: int, n: int, k: int) -> bool:
    """Whether the kernels take this shape; others run on the torch path (``model/topk.py``)."""
    if not 0 < k < n:
        return False
    layout = _Layout(n, k)  # and the eager path's flat workspaces (int32, float32, backward scratch)
    largest = batch * max(layout.index_length + k * layout.group + n, 2 * layout.level_length + n)
    return max(largest, batch * (n + 3 * layout.pair_length)) <= MAX_ELEMENTS


def launches_per_call(n: int, k: int) -> int:
    """Triton launches of one forward + backward, n > k: R rounds + compose (none when R = 1) + mix, then mix +
    (R - 1) + R."""
    rounds = len(round_widths(n, k))
    return 3 * rounds + 2 - (rounds == 1)  # a single round writes what _plan_compose would


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
    left = tl.load(index + pair_left + slot, mask=live, other=0)
    right = tl.load(index + pair_right + slot, mask=live, other=-1)
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
    FLIP: tl.constexpr,
    SORT_BACK: tl.constexpr,
    BLOCK: tl.constexpr,
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
    index = index_ptr + row * index_stride
    tl.store(index + level_offset + left, 2 * slot, mask=live)
    tl.store(index + level_offset + right, 2 * slot + 1, mask=paired)
    tl.store(index + pair_left + slot, left.to(tl.int32), mask=live)
    tl.store(index + pair_right + slot, tl.where(paired, right.to(tl.int32), -1), mask=live)
    # the next level's keys, or after the last round the pooled scores and mask
    next_key = tl.where(new_real, new_score, -float("inf"))
    if last == 0:
        tl.store(value_ptr + row * value_stride + next_offset + slot, next_key, mask=live)
    else:
        tl.store(pooled_scores_ptr + row * new_width + slot, new_score, mask=live)
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
        tl.store(source_ptr + flat_slot, left.to(tl.int64), mask=live)


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
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // blocks).to(tl.int64)
    position = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    live = position < n
    index = index_ptr + row * index_stride
    weights = value_ptr + row * value_stride + level_length
    # every position walks up the rounds: its slot, the product of its pair weights, left/right bits
    slot = position
    weight = tl.full([BLOCK], 1.0, tl.float32)
    bits = tl.zeros([BLOCK], tl.int32)
    width = n
    offset = 0
    for r in range(num_rounds):
        code = tl.load(index + offset + slot, mask=live, other=0)
        weight = weight * tl.load(weights + offset + slot, mask=live, other=0.0)
        bits = bits | ((code & 1) << r)
        slot = code >> 1
        offset += width
        width = tl.maximum(k, (width + 1) // 2)
    flat_slot = row * k + slot
    tl.store(members_ptr + members_base + flat_slot * group + bits, position, mask=live)
    tl.store(wpos_ptr + wpos_base + row * n + position, weight, mask=live)
    tl.store(slot_ptr + slot_base + row * n + position, flat_slot.to(tl.int32), mask=live)
    tl.store(source_ptr + flat_slot, position.to(tl.int64), mask=live & (bits == 0))


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
    BLOCK: tl.constexpr,
):
    row, slot, live, left, right, paired = _block_of_pairs(
        index_ptr, blocks, new_width, index_stride, pair_left, pair_right, BLOCK
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
    BLOCK: tl.constexpr,
):
    row, slot, live, left, right, paired = _block_of_pairs(
        index_ptr, blocks, new_width, index_stride, pair_left, pair_right, BLOCK
    )
    right = tl.where(paired, right, 0)
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
    grad_left = later * tl.load(subtree + left, mask=live, other=0.0) + adjoint * score_left
    grad_right = tl.where(paired, later * tl.load(subtree + right, mask=paired, other=0.0) + adjoint * score_right, 0.0)
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
        tl.store(a_out + left, tl.where(real_left, adjoint_left, 0.0), mask=live)
        tl.store(a_out + right, tl.where(real_right, adjoint_right, 0.0), mask=paired)
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
        member = tl.load(members_ptr + members_base + slots * group + g, mask=valid, other=0)
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
    total_positions,
    dim,
    BLOCK_POSITIONS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
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
        tl.store(
            grad_x_ptr + positions[:, None] * dim + cols[None, :],
            (weight[:, None] * grad_rows).to(grad_x_ptr.dtype.element_ty),
            mask=ok,
        )
        dot += tl.sum(grad_rows * rows, axis=1)
    tl.store(grad_wpos_ptr + positions, dot, mask=valid)


if AVAILABLE:  # device functions called by the kernels
    _block_of_pairs = triton.jit(_block_of_pairs)
    _member_scores = triton.jit(_member_scores)

#: the plan kernels: no specialization on integers or pointer alignment (one compiled kernel for all widths)
_UNSPECIALIZED = ("_plan_round", "_plan_compose", "_plan_subtree", "_plan_reverse")


#: arguments of the mix kernels not specialized: section offsets inside the workspaces (0 on the custom-op path)
_BASES = ("wpos_base", "members_base", "slot_base")


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


# ------------------------------------------------------------------------------------------- launchers


class _Sections(NamedTuple):
    """Where members, slot_of_position and weight_of_position start inside their tensors: 0 when each is a
    tensor of its own, else after the plan inside one int32 / one float32 workspace (see plan_forward)."""

    members: int = 0
    slot: int = 0
    wpos: int = 0


#: sections of tensors of their own
SEPARATE = _Sections()


def _workspace_sections(batch: int, n: int, k: int) -> _Sections:
    """int32 workspace: plan index B×(L_w + 2·L_m) | members B×k×G | slot B×n; float32: plan values B×2·L_w |
    weight_of_position B×n (flat, row-major sections)."""
    layout = _Layout(n, k)
    members = batch * layout.index_length
    return _Sections(members, members + batch * k * layout.group, batch * 2 * layout.level_length)


@functools.cache
def _negative_infinity(device: torch.device) -> Tensor:
    """A 0-dim float32 -inf on ``device`` (read only)."""
    return torch.tensor(-math.inf, dtype=torch.float32, device=device)


def plan_forward(
    scores: Tensor, mask: Tensor, k: int, base: float, flip_right: bool, sort_back: bool, shared: bool = False
):
    """The rounds on scores. scores: B×n float32 (padding entries are read as 0), mask: B×n bool.

    Returns members B×k×G int32 (dummy = n), weight_of_position B×n float32, slot_of_position B×n int32
    (flat b·k + slot), pooled scores B×k float32, pooled mask B×k bool, source_index B×k int64, and the
    saved plan: index B×(L_w + 2·L_m) int32 and values B×2·L_w float32 (see the module docstring).
    ``shared``: members, slot_of_position and the plan index are one flat int32 workspace, weight_of_position
    and the plan values one flat float32 workspace (sections: :func:`_workspace_sections`), two allocations
    instead of seven (eager calls; a custom op may not return aliasing outputs).
    """
    batch, n = scores.shape
    layout = _Layout(n, k)
    num_rounds, group = len(layout.new_widths), layout.group
    index_stride, value_stride = layout.index_length, 2 * layout.level_length
    new = functools.partial(torch.empty, device=scores.device)
    if shared:  # the whole int32 workspace starts as n: the member table's dummies
        sections = _workspace_sections(batch, n, k)
        plan_index = members = slot_of_position = torch.full(
            (sections.slot + batch * n,), n, dtype=torch.int32, device=scores.device
        )
        plan_value = weight_of_position = new(sections.wpos + batch * n, dtype=torch.float32)
    else:
        sections = _Sections()
        plan_index = new(batch, index_stride, dtype=torch.int32)
        plan_value = new(batch, value_stride, dtype=torch.float32)
        members = torch.full((batch, k, group), n, dtype=torch.int32, device=scores.device)
        weight_of_position = new(batch, n, dtype=torch.float32)
        slot_of_position = new(batch, n, dtype=torch.int32)
    pooled_scores = new(batch, k, dtype=torch.float32)
    pooled_mask = new(batch, k, dtype=torch.bool)
    source_index = new(batch, k, dtype=torch.int64)
    # level 0 keys: the torch path's ranking key (padding -inf); the first round copies them into the plan
    # contiguous: row stride n; -inf as a cached tensor (a Python scalar dispatches one scalar_tensor per call)
    keys = torch.where(mask.contiguous(), scores.contiguous(), _negative_infinity(scores.device))
    key_stride, key_offset = n, 0
    log2_base = math.log2(base)
    for r, (width, new_width) in enumerate(zip(layout.widths, layout.new_widths, strict=True)):
        level = layout.level_offsets[r]
        if r:
            keys, key_stride, key_offset = plan_value, value_stride, level
            level_keys = plan_value.as_strided((batch, width), (value_stride, 1), level)
        else:
            level_keys = keys
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
            FLIP=flip_right,
            SORT_BACK=sort_back,
            BLOCK=PAIR_BLOCK,
            num_warps=PAIR_WARPS,
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
    shape: Optional[tuple[int, int]] = None,
) -> Tensor:
    """Gradient of the scores (B×n float32) from those of weight_of_position (B×n) and pooled scores (B×k;
    None: zero). With ``shape`` (B, n) given, the plan is :func:`plan_forward`'s shared workspaces and
    grad_weight_of_position the flat float32 scratch of :func:`backward_scratch` (dW in its first B·n
    entries, this function's work space after them)."""
    shared = shape is not None
    batch, n = shape if shared else grad_weight_of_position.shape
    layout = _Layout(n, k)
    num_rounds, pairs = len(layout.new_widths), layout.pair_length
    index_stride, value_stride = layout.index_length, 2 * layout.level_length
    grad_wpos = grad_weight_of_position if shared else grad_weight_of_position.float().contiguous()
    grad_pooled = None if grad_pooled_scores is None else grad_pooled_scores.float().contiguous()
    grad_scores = torch.empty(batch, n, dtype=torch.float32, device=plan_index.device)
    # per level above the input, indexed like the new slots of the round that made it: T, Q, A
    work_stride = 3 * pairs
    if shared:
        work, work_base = grad_wpos, batch * n
    else:
        work, work_base = torch.empty(batch, 3 * pairs, dtype=torch.float32, device=plan_index.device), 0

    def subtree(r):  # T of level r: dW at the input, else the section written by round r - 1
        return (grad_wpos, n, 0) if r == 0 else (work, work_stride, work_base + layout.pair_offsets[r - 1])

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
            BLOCK=PAIR_BLOCK,
            num_warps=PAIR_WARPS,
        )
    log2_base, ln_base = math.log2(base), math.log(base)
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
        if bottom:
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
            BLOCK=PAIR_BLOCK,
            num_warps=PAIR_WARPS,
        )
    return grad_scores


def mix_forward(
    x: Tensor, weight_of_position: Tensor, members: Tensor, k: int, sections: _Sections = SEPARATE
) -> Tensor:
    """values[b, j] = Σ_g W[b, members[b, j, g]] · x[b, members[b, j, g]]  (B×n×d → B×k×d; dummy = n)."""
    batch, n, dim = x.shape
    group = _Layout(n, k).group
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


def backward_scratch(batch: int, n: int, k: int, device) -> Tensor:
    """One flat float32 tensor for dW (B×n, from mix_backward) and plan_backward's work space after it."""
    return torch.empty(batch * (n + 3 * _Layout(n, k).pair_length), dtype=torch.float32, device=device)


def mix_backward(
    grad_values: Tensor,
    x: Tensor,
    weight_of_position: Tensor,
    slot_of_position: Tensor,
    sections: _Sections = SEPARATE,
    grad_weight: Optional[Tensor] = None,
):
    """grad_x[p] = W(p)·grad_values[slot(p)] (B×n×d) and grad_W[p] = <x[p], grad_values[slot(p)]> (B×n, or
    the first B·n entries of ``grad_weight``)."""
    batch, n, dim = x.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
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
        grad_x,
        grad_weight,
        sections.wpos,
        sections.slot,
        batch * n,
        dim,
        BLOCK_POSITIONS=MIX_ROWS,
        BLOCK_DIM=block_dim,
    )
    return grad_x, grad_weight


class _TopK(torch.autograd.Function):
    """Eager autograd over the launchers: the plan and mix forward, the mix and plan backward."""

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
        ) = plan_forward(scores, mask, k, base, flip_right, sort_back, shared=True)
        ctx.sections = _workspace_sections(x.size(0), x.size(1), k)
        values = mix_forward(x, weight_of_position, members, k, ctx.sections)
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
        scratch = backward_scratch(batch, n, ctx.k, x.device)
        grad_x, _ = mix_backward(grad_values, x, plan_value, plan_index, ctx.sections, scratch)
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = plan_backward(
                scratch, grad_pooled_scores, plan_index, plan_value, ctx.k, ctx.base, shape=(batch, n)
            )
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
