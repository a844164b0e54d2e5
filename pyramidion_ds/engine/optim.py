"""Optimizer, learning-rate schedule and loss, as fairseq users know them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import TrainConfig

#: parameters of the encoder's top-k scorers (``model.encoder.scorers``), whatever wraps the model
SCORER_PARAMS = ".encoder.scorers."


def is_scorer_param(name: str) -> bool:
    """True for a parameter of a top-k scorer, by its ``named_parameters`` name (ZeRO-3 keeps names)."""
    return SCORER_PARAMS in f".{name}"


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, scorer_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and embeddings' positions (1-D tensors).

    With ``scorer_lr_scale`` != 1 the scorers' parameters get groups of their own at ``lr × scale``
    (after the model's groups, so group 0 still carries the model's lr); a schedule multiplies every
    group's own lr, so the ratio holds at every step. At 1 the groups stay the two of old, and so does
    the optimizer state of existing checkpoints. Empty groups are left out.
    """
    split = scorer_lr_scale != 1.0
    groups = {(scorer, decays): [] for scorer in (False, True) for decays in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # under ZeRO-3 a partitioned parameter is flat; ds_shape keeps its real shape
        shape = getattr(param, "ds_shape", param.shape)
        groups[(split and is_scorer_param(name), len(shape) >= 2)].append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * scorer_lr_scale if scorer else lr,
        }
        for (scorer, decays), params in groups.items()
        if params
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, *, offload: bool) -> tuple[torch.optim.Optimizer, str]:
    """AdamW: DeepSpeedCPUAdam under optimizer offload, FusedAdam on CUDA where it builds, else torch's.

    Every group carries its own lr (see :func:`param_groups`); DeepSpeed's ZeRO and mixed-precision
    wrappers keep these groups, and the client schedule (:func:`make_scheduler`) scales each of them.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.scorer_lr_scale)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs), "DeepSpeedCPUAdam"
    if torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs), "FusedAdam"
        except Exception as err:  # the op did not build (no compiler, wrong arch list): torch's fused kernel
            print(f"FusedAdam unavailable ({type(err).__name__}: {err}); using torch.optim.AdamW(fused=True)")
            return torch.optim.AdamW(groups, fused=True, **kwargs), "torch.AdamW(fused)"
    return torch.optim.AdamW(groups, **kwargs), "torch.AdamW"


def lr_lambda(cfg: TrainConfig):
    """Multiplier of ``cfg.lr`` at update ``step`` (0-based), fairseq's schedules.

    polynomial_decay: linear warmup to lr, then (lr - end) * (1 - t/T)**power + end until
    total_num_update (default max_update); inverse_sqrt: warmup, then lr * sqrt(warmup / step);
    fixed: warmup, then lr.
    """
    warmup = cfg.warmup_updates
    total = cfg.total_num_update or cfg.max_update
    end_ratio = cfg.end_learning_rate / cfg.lr

    def polynomial(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not total or step >= total:
            return end_ratio if total else 1.0
        remaining = 1.0 - (step - warmup) / max(1, total - warmup)
        return (1.0 - end_ratio) * remaining**cfg.power + end_ratio

    def inverse_sqrt(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return math.sqrt(max(1, warmup) / max(1, step + 1))

    def fixed(step: int) -> float:  # fairseq's fixed schedule: constant after the linear warmup
        return (step + 1) / warmup if warmup and step < warmup else 1.0

    return {"polynomial_decay": polynomial, "inverse_sqrt": inverse_sqrt, "fixed": fixed}[cfg.lr_scheduler]


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """LambdaLR: every group's lr is its own initial lr × :func:`lr_lambda` (group ratios hold)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def label_smoothed_nll_loss(
    logits: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's label-smoothed cross-entropy, summed over non-pad tokens.

    logits: B×T×V, target: B×T. Returns (loss, nll_loss), both sums; epsilon = 0 gives plain CE.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1).view(-1, logits.size(-1))
    target = target.reshape(-1)
    keep = target.ne(ignore_index)
    nll = -lprobs.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
    nll = nll.masked_fill(~keep, 0.0).sum()
    if epsilon == 0.0:
        return nll, nll
    smooth = -lprobs.sum(dim=-1).masked_fill(~keep, 0.0).sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    return loss, nll
