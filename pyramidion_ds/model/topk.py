"""Successive-halving top-k: the trainable pooling operator of Pyramidion (arXiv 2009.05169).

One round takes a width-w sequence to width m (w/2 <= m < w)::

    rank by score:   r0 r1 ... r(p-1) | P0 P1 ... P(h-1) | Q0 Q1 ... Q(h-1)      p = 2m - w, h = w - m
                     pass through      top half           bottom half
    flip_right:      P0+Q(h-1)  P1+Q(h-2)  ...            (best with worst; else P_i with Q_i)
    new slot:        w_P * x_P + w_Q * x_Q,  (w_P, w_Q) = softmax(base**s_P, base**s_Q); same for scores

Rounds repeat until the width reaches k (a full round has p = 0). Padding always loses: its logit is a
large negative number, so it ranks last and gets weight 0 next to a real token.

How it is computed. The mixing weights of every round depend on the scores only, so the rounds run on
B×w score-sized tensors and keep, for every output slot, the *members* (input positions) it mixes and
their total weights, in a binary-tree layout ``B×k×G`` (G = 2**rounds; a pass-through slot is paired
with a weight-0 dummy). The representations B×n×d are then gathered and mixed once
(:class:`_MixMembers`), whose backward needs only a gather of the output gradient per input position:
each input position belongs to exactly one output slot. Member ``[..., 0]`` is the slot's dominant
source (the higher-weighted member at every level), reported as ``source_index``.

On CUDA the same plan and mix run as Triton kernels on fixed-size blocks (:mod:`.topk_triton`: per round
a batched torch sort and one kernel; a row spreads over many programs); ``PYRAMIDION_TOPK=auto|torch|triton``
chooses (``docs/topk_kernels.md``). ``hard`` mode stays on torch in both: ``topk`` and a few ``gather``s.

The encoder's pooling is :func:`score_and_pool`: the scorer (``Linear(d, 1)``, centred over the real
positions, ``sigmoid + 1e-5``) and the top-k. Its first round ranks by the scorer's logit, which orders the
slots as their scores do without the ties the sigmoid's rounding makes. On the Triton path it is one fused
operator (the scorer's dot product, centring and sigmoid inside the plan kernels, its backward beside
theirs); elsewhere it is the torch operators below.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: logit of a padding slot: ranks below every real token (base**s >= 1) and gets weight 0 next to one
PAD_LOGIT = -1.0e4
#: logit of the dummy partner of a pass-through slot: loses even against padding
DUMMY_LOGIT = -3.0e4


class TopKOutput(NamedTuple):
    values: Tensor  #: B×k×d pooled representations
    scores: Tensor  #: B×k pooled scores
    mask: Tensor  #: B×k bool, True where the slot holds real (non-padding) content
    source_index: Tensor  #: B×k long, input position that dominates each slot's mixing weight


def round_widths(n: int, k: int) -> list[int]:
    """Widths after each round taking ``n`` to ``k``: halve, and end with a partial round if needed."""
    widths, width = [], n
    while width > k:
        width = max(k, (width + 1) // 2)
        widths.append(width)
    return widths


def successive_halving_topk(
    x: Tensor,
    scores: Tensor,
    k: int,
    *,
    base: float = 20.0,
    flip_right: bool = True,
    sort_back: bool = False,
    mask: Optional[Tensor] = None,
    hard: bool = False,
    rank_key: Optional[Tensor] = None,
) -> TopKOutput:
    """Pool ``x`` (B×n×d) to k slots guided by ``scores`` (B×n, in (0, 1]).

    ``mask`` (B×n bool, True = real token) marks padding, which never outranks a real token.
    ``rank_key`` (B×n, increasing with the scores, e.g. the logits they came from) ranks the first round
    instead of the scores themselves. ``sort_back`` keeps survivors in document order; otherwise slots come
    out by rank.
    ``hard`` selects the exact top-k by score with no mixing (inference). Gradients reach ``x`` and
    ``scores`` (through the mixing weights and the mixed scores). When k >= n the input is returned.
    """
    if x.dim() != 3 or scores.shape != x.shape[:2]:
        raise ValueError(
            f"successive_halving_topk: x must be B×n×d and scores B×n, got x {tuple(x.shape)} "
            f"and scores {tuple(scores.shape)}"
        )
    batch, n, _ = x.shape
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=x.device)
    elif mask.shape != scores.shape:
        raise ValueError(
            f"successive_halving_topk: mask must be B×n like scores {tuple(scores.shape)}, got {tuple(mask.shape)}"
        )
    if k < 1:
        raise ValueError(f"successive_halving_topk: k must be positive, got {k}")
    if k >= n:
        positions = torch.arange(n, device=x.device).expand(batch, n)
        return TopKOutput(x, scores, mask, positions)
    # ranking and mixing weights in at least float32 whatever the activations' dtype
    # float64 stays float64, everything narrower ranks in float32 (a plain comparison: torch.promote_types
    # dispatches an operator, one per pooling per step)
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if not hard and _use_triton(x, compute_dtype, k):  # the kernels read padding scores as 0 themselves
        from . import topk_triton

        return TopKOutput(
            *topk_triton.pool(x, scores.to(compute_dtype), mask, k, base, flip_right, sort_back, rank_key)
        )
    scores = torch.where(mask, scores.to(compute_dtype), 0.0)
    if hard:
        return _hard_topk(x, scores if rank_key is None else rank_key, mask, k, sort_back, scores)
    members, weights, pooled_scores, pooled_mask = _pooling_plan(scores, mask, k, base, flip_right, sort_back, rank_key)
    values = _MixMembers.apply(x, weights, members)
    return TopKOutput(values, pooled_scores, pooled_mask, members[..., 0])


def centre_logits(logits: Tensor, real_mask: Tensor) -> Tensor:
    """B×n scorer logits minus their mean over each row's real positions (padding is left as it is).

    The top-k mixes a pair by softmax(base**s), so lowering every score together softens every mix toward
    an average of the pair. Uncentred, the scorer's bias does that, and when averaging lowers the loss
    (early training on SumPubMed) it drives the sigmoid to its floor, where the scorer's gradient is ~1e-5
    of its size and it never recovers (docs/pretraining.md). Centred, the average is at s = 0.5 for every
    slot, the sigmoid's steepest point: the same mixing stays reachable and the scorer keeps learning.
    """
    real = real_mask.to(logits.dtype)
    mean = (logits * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1.0)
    return logits - mean


class Pooled:
    """What the encoder's pooling (:func:`score_and_pool`) gives: ``values`` B×k×d and ``mask`` B×k, and its
    statistics ``scores`` (B×n, the scorer's), ``pooled_scores`` (B×k) and ``source_index`` (B×k long).

    On the torch path the statistics are the tensors the step computed (they may require grad); the fused
    Triton path keeps them in its workspaces and makes each (without gradient) only when it is read, so a
    training step that reads none dispatches nothing for them.
    """

    def __init__(self, values: Tensor, mask: Tensor, statistics) -> None:
        self.values, self.mask, self._statistics = values, mask, statistics

    @property
    def scores(self) -> Tensor:
        return self._statistics.scores

    @property
    def pooled_scores(self) -> Tensor:
        return self._statistics.pooled_scores

    @property
    def source_index(self) -> Tensor:
        return self._statistics.source_index


class _Computed(NamedTuple):
    scores: Tensor
    pooled_scores: Tensor
    source_index: Tensor


def pool_by_logits(x: Tensor, logits: Tensor, mask: Tensor, k: int, centre: bool, **options) -> Pooled:
    """The top-k of ``x`` by the scorer's B×n float32 ``logits``: scores σ(logits [− their mean over the real
    positions]) + 1e-5, the first round ranked by the logits."""
    scores = torch.sigmoid(centre_logits(logits, mask) if centre else logits) + 1e-5
    out = successive_halving_topk(x, scores, k, mask=mask, rank_key=logits, **options)
    return Pooled(out.values, out.mask, _Computed(scores, out.scores, out.source_index))


def score_and_pool(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    mask: Tensor,
    k: int,
    *,
    centre: bool,
    layer_norm_input: bool = False,
    base: float = 20.0,
    flip_right: bool = True,
    sort_back: bool = False,
    hard: bool = False,
) -> Pooled:
    """The encoder's pooling: the scorer ``Linear(d, 1)`` (``weight`` 1×d, ``bias`` (1,) or None) of ``x`` (or of
    its affine-free layer norm), centred over the real positions (``centre``: a bias would cancel), σ + 1e-5, then
    the top-k to ``k`` slots (the scores' padding entries are 0 on the fused path).

    On the Triton path (eager, soft, ``hidden`` input) this is one fused operator
    (:func:`.topk_triton.score_pool`); elsewhere the scorer runs as torch operators. Call it inside the
    scorer module's forward: ZeRO-3 gathers a module's parameters around its forward only.
    """
    if x.dim() != 3 or weight.shape != (1, x.size(-1)):
        raise ValueError(
            f"score_and_pool: x must be B×n×d and weight 1×d, got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    options = dict(base=base, flip_right=flip_right, sort_back=sort_back, hard=hard)
    if k < x.size(1) and not (hard or layer_norm_input or torch.compiler.is_compiling()):
        if _use_triton(x, torch.float32, k):  # (the scores are float32: the logits are, below)
            from . import topk_triton

            return Pooled(*topk_triton.score_pool(x, weight, bias, mask, k, base, flip_right, sort_back, centre))
    h = F.layer_norm(x, x.shape[-1:]) if layer_norm_input else x
    logits = F.linear(h, weight, bias).squeeze(-1).float()
    return pool_by_logits(x, logits, mask, k, centre, **options)


#: environment variable choosing the implementation: auto (Triton on CUDA, torch elsewhere), torch, triton
BACKEND_ENV = "PYRAMIDION_TOPK"


def _use_triton(x: Tensor, compute_dtype: torch.dtype, k: int) -> bool:
    """Whether this call runs the Triton kernels (see ``docs/topk_kernels.md``).

    ``auto``: CUDA tensors with float32 ranking (bf16/fp16/fp32 scores) when triton imports. ``triton`` forces
    the kernels (CPU tensors then run in Triton's interpreter: tests only); ``torch`` forces the torch path.
    A shape the kernels do not take (:func:`.topk_triton.supports`) runs on the torch path in both.
    """
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice == "torch":
        return False
    if choice not in ("auto", "triton"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected auto, torch or triton")
    if choice == "auto" and not x.is_cuda:
        return False
    from . import topk_triton

    supported = compute_dtype == torch.float32 and x.dtype != torch.float64
    if choice == "triton":
        if not topk_triton.AVAILABLE or not supported:
            raise ValueError(
                f"{BACKEND_ENV}=triton: needs an importable triton and float32 (or narrower) "
                f"scores and x, got scores in {compute_dtype} and x in {x.dtype}"
            )
        return topk_triton.supports(x.size(0), x.size(1), k, x.size(2))
    return (
        x.is_cuda and supported and topk_triton.AVAILABLE and topk_triton.supports(x.size(0), x.size(1), k, x.size(2))
    )


def _hard_topk(x: Tensor, key: Tensor, mask: Tensor, k: int, sort_back: bool, scores: Tensor) -> TopKOutput:
    """Exact top-k selection by ``key`` (padding last); slots by rank, or in document order with ``sort_back``."""
    key = torch.where(mask, key.to(scores.dtype), -math.inf)
    index = key.topk(k, dim=1).indices
    if sort_back:
        index = index.sort(dim=1).values
    values = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.size(-1)))
    return TopKOutput(values, scores.gather(1, index), mask.gather(1, index), index)


def _pooling_plan(
    scores: Tensor, mask: Tensor, k: int, base: float, flip_right: bool, sort_back: bool, rank_key: Optional[Tensor]
):
    """Run the rounds on scores only (the first ranked by ``rank_key`` when given).

    Returns members B×k×G (input positions, ``n`` for a dummy), weights B×k×G (differentiable in
    ``scores``; 0 for dummies and padding beside real tokens), pooled scores B×k and mask B×k.
    """
    batch, n = scores.shape
    device = scores.device
    members = torch.arange(n, device=device).view(1, n, 1).expand(batch, n, 1)
    weights = None  # all ones before the first round
    for new_width in round_widths(n, k):
        width = scores.size(1)
        num_pass, num_pairs = 2 * new_width - width, width - new_width
        logits = torch.where(mask, torch.pow(base, scores), PAD_LOGIT)
        # rank by score (as stated, not by base**score, which can round distinct scores together); the stable
        # sort puts real ties and all padding (-inf) in position order, on every device and in the Triton path
        key = scores if rank_key is None else rank_key.to(scores.dtype)
        rank_key = None  # later rounds rank by the mixed scores
        order = torch.where(mask, key, -math.inf).argsort(dim=1, descending=True, stable=True)
        left = order[:, num_pass : num_pass + num_pairs]
        right = order[:, num_pass + num_pairs :]
        if flip_right:
            right = right.flip(1)
        if num_pass:
            # pass-through slots pair with a dummy appended at index `width` that gets weight 0
            if weights is None:
                weights = scores.new_ones(batch, width, 1)
            left = torch.cat([order[:, :num_pass], left], dim=1)
            right = torch.cat([right.new_full((batch, num_pass), width), right], dim=1)
            scores = _append(scores, 0.0)
            logits = _append(logits, DUMMY_LOGIT)
            mask = _append(mask, False)
            members = _append(members, n)
            weights = _append(weights, 0.0)
        if sort_back:  # document order of each slot's dominant (left) member
            perm = left.argsort(dim=1)
            left, right = left.gather(1, perm), right.gather(1, perm)
        pairs = torch.stack([left, right], dim=2).view(batch, 2 * new_width)  # B×(2m): l0 r0 l1 r1 ...
        pair_weights = logits.gather(1, pairs).view(batch, new_width, 2).softmax(dim=-1)
        scores = (scores.gather(1, pairs).view(batch, new_width, 2) * pair_weights).sum(-1)
        mask = mask.gather(1, pairs).view(batch, new_width, 2).any(-1)
        group = members.size(2)
        members = members.gather(1, pairs.unsqueeze(-1).expand(-1, -1, group)).view(batch, new_width, 2 * group)
        if weights is None:  # first round, every slot a single position
            weights = pair_weights
        else:
            gathered = weights.gather(1, pairs.unsqueeze(-1).expand(-1, -1, group))
            weights = (gathered.view(batch, new_width, 2, group) * pair_weights.unsqueeze(-1)).view(
                batch, new_width, 2 * group
            )
    return members, weights, scores, mask


def _append(t: Tensor, value) -> Tensor:
    """Append one slot filled with ``value`` along dim 1 (B×w[×g] → B×(w+1)[×g])."""
    pad = t.new_full((t.size(0), 1) + tuple(t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)


class _MixMembers(torch.autograd.Function):
    """values[b, j] = Σ_g weights[b, j, g] · x[b, members[b, j, g]]  (B×n×d → B×k×d).

    Forward gathers and mixes once: on CPU one ``embedding_bag`` (fused gather + weighted sum), on CUDA
    a gather into B·k×G×d and one bmm (measured faster there than embedding_bag's kernel). Backward uses that every
    input position i sits in exactly one slot(i) with one total weight W(i)::

        grad_x[i] = W(i) · grad_values[slot(i)]        grad_weights at i = <x[i], grad_values[slot(i)]>

    so it gathers the k-row gradient per position instead of scattering into n rows. Dummy members
    (index n) gather row 0 with weight 0 and receive no gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, members: Tensor) -> Tensor:
        batch, n, dim = x.shape
        k, group = members.shape[1:]
        offsets = torch.arange(batch, device=x.device).view(batch, 1, 1) * n
        has_dummies = group * k > n
        flat_members = (members.clamp(max=n - 1) if has_dummies else members) + offsets
        x_rows, mix_weights = x.reshape(batch * n, dim), weights.to(x.dtype).view(batch * k, group)
        if x.is_cuda:  # H100 bf16: gather + bmm 134 us, embedding_bag 169 us (B=8, 8192→2048, d=512)
            gathered = x_rows.index_select(0, flat_members.view(-1)).view(batch * k, group, dim)
            values = torch.bmm(mix_weights.unsqueeze(1), gathered).view(batch * k, dim)
        else:  # CPU: the fused gather + weighted sum is ~3× faster than filling a B×k×G×d buffer
            values = F.embedding_bag(
                flat_members.view(batch * k, group), x_rows, per_sample_weights=mix_weights, mode="sum"
            )
        # per input position: its slot (row of the flattened B×k output) and total weight; dummies land
        # in the extra column n, which is dropped
        slot = torch.arange(batch * k, device=x.device).view(batch, k, 1).expand(batch, k, group)
        slot_of_position = torch.empty(batch, n + 1, dtype=torch.long, device=x.device)
        slot_of_position.scatter_(1, members.reshape(batch, k * group), slot.reshape(batch, k * group))
        weight_of_position = weights.new_empty(batch, n + 1)
        weight_of_position.scatter_(1, members.reshape(batch, k * group), weights.reshape(batch, k * group))
        ctx.save_for_backward(x, flat_members, slot_of_position[:, :n], weight_of_position[:, :n])
        return values.view(batch, k, dim)

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, flat_members, slot_of_position, weight_of_position = ctx.saved_tensors
        batch, n, dim = x.shape
        k, group = flat_members.shape[1:]
        # the gradient row of each position's slot; becomes grad_x in place (no second n-row buffer)
        grad_rows = grad_values.reshape(batch * k, dim).index_select(0, slot_of_position.reshape(-1))
        grad_weights = None
        if ctx.needs_input_grad[1]:
            # a dummy's (clamped) entry gets some finite gradient; harmless: its weight is a constant 0
            # times the pair weight, so nothing flows on from it
            x_rows = x.reshape(batch * n, dim)
            if x.is_cuda:  # cuBLAS runs this batched dot as a slow gemv; two elementwise kernels are faster
                per_position = (grad_rows * x_rows).sum(-1, dtype=weight_of_position.dtype)
            else:  # on CPU the einsum (bmm) avoids a fresh n-row temporary
                per_position = torch.einsum("nd,nd->n", grad_rows, x_rows).to(weight_of_position.dtype)
            grad_weights = per_position.index_select(0, flat_members.view(-1)).view(batch, k, group)
        grad_x = grad_rows.mul_(weight_of_position.reshape(-1, 1).to(grad_rows.dtype)).view(batch, n, dim)
        return grad_x, grad_weights, None
