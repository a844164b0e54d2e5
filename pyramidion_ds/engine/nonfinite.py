"""Skip an update whose gradients are not finite, with one fused check instead of DeepSpeed's per-tensor scan.

DeepSpeed's bf16 ZeRO-1/2 optimizer scans every gradient tensor for inf/NaN before each step (two
reductions and a few elementwise kernels per tensor: about half the kernel launches of a step on the
``base`` model). The shipped bf16 JSONs turn that scan off (``"bf16": {"check_grad_overflow": false}``);
without it DeepSpeed would apply a NaN update. Instead the trainer, before the update's
``engine.step()``:

    local_grads_nonfinite(engine)   one fused norm (torch._foreach_norm) over this rank's reduced,
                                    partitioned gradients -> 0-dim tensor, no host sync
    (all-reduced with the loss flags and the stop flag: every rank takes the same decision)
    with skipped_step(engine):      engine.step() runs as usual, but our optimizer and LR schedule
        engine.step()               do not move: weights, optimizer state and the schedule stay as
                                    they were, bit for bit; DeepSpeed zeroes the gradients

Where the reduced gradients live at the accumulation boundary, by optimizer::

    ZeRO-1/2   optimizer.averaged_gradients[group]   (one flat partition, or a list of views into it);
               with optimizer offload: optimizer.single_partition_of_fp32_groups[group].grad
    ZeRO-3     optimizer.grad_partitions_flat_buffer (one flat buffer);
               with optimizer offload: optimizer.fp32_partitioned_groups_flat[sub_group].grad
    ZeRO-0     bf16: optimizer.fp32_groups_gradients_flat; fp32: the module's param.grad

fp16 keeps DeepSpeed's loss scaler, which skips overflowing steps itself.
"""

from __future__ import annotations

import contextlib

import torch


def partitioned_grads(engine) -> list[torch.Tensor]:
    """This rank's reduced gradients at the accumulation boundary (after ``engine.backward``)."""
    opt = engine.optimizer
    flat = getattr(opt, "grad_partitions_flat_buffer", None)  # ZeRO-3
    if flat is not None and not getattr(opt, "offload_optimizer", False):
        return [flat]
    if getattr(opt, "offload_optimizer", False):  # ZeRO-3 offload
        return [p.grad for p in opt.fp32_partitioned_groups_flat if p is not None and p.grad is not None]
    averaged = getattr(opt, "averaged_gradients", None)  # ZeRO-1/2
    if averaged is not None and hasattr(opt, "bit16_groups"):
        if getattr(opt, "cpu_offload", False):
            return [p.grad for p in opt.single_partition_of_fp32_groups if p.grad is not None]
        grads = []
        for group in averaged.values():
            if group is None:
                continue
            flat_partition = getattr(group, "flat_partition", None)
            grads.extend([flat_partition] if flat_partition is not None else [g for g in group if g is not None])
        return grads
    flat_groups = getattr(opt, "fp32_groups_gradients_flat", None)  # ZeRO-0 bf16
    if flat_groups is not None:
        return list(flat_groups)
    return [p.grad for p in engine.module.parameters() if p.grad is not None]


def local_grads_nonfinite(engine) -> torch.Tensor:
    """1.0 when this rank's gradients hold an inf or NaN, else 0.0 (0-dim float on the engine's device).

    One fused norm over all tensors (a NaN or inf anywhere makes the total non-finite), no host sync.
    """
    grads = partitioned_grads(engine)
    device = engine.device
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads)  # one multi-tensor kernel per dtype/device, not one per tensor
    if len({(n.dtype, n.device) for n in norms}) == 1:
        total = torch.stack(norms).float().sum()
    else:
        total = sum(n.float().to(device) for n in norms)
    return (~torch.isfinite(total)).float().to(device)


@contextlib.contextmanager
def skipped_step(engine):
    """Inside it, ``engine.step()`` leaves weights, optimizer state and LR schedule exactly as they were.

    DeepSpeed's wrappers call our optimizer's ``step`` and then copy their fp32 master weights (which
    that step would have changed) back into the model: with the inner step a no-op the copy writes
    the same values. The LR schedule is ours too and does not advance. DeepSpeed zeroes the gradients
    as after any step.
    """
    inner = engine.optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer  # the torch/DeepSpeed Adam inside DeepSpeed's ZeRO/bf16 wrapper
    targets = [obj for obj in (inner, engine.lr_scheduler) if obj is not None]
    # an instance attribute shadows the class's method; torch's LR scheduler already wraps the
    # optimizer's step in one, which is put back afterwards
    saved = [obj.__dict__.get("step") for obj in targets]
    for obj in targets:
        obj.step = _no_step
    try:
        yield
    finally:
        for obj, step in zip(targets, saved, strict=True):
            if step is None:
                del obj.step
            else:
                obj.step = step


def _no_step(*args, **kwargs) -> None:
    return None
