"""Measure the activation memory of one real training micro-step (forward + loss + backward).

What is measured is the peak of memory allocated *above* parameters and gradients (both allocated
before the measured step), i.e. exactly the quantity :func:`..memory.activation_bytes` estimates.

How, per device:

- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the step.
- CPU: torch's CPU allocator reports every allocation and free to the profiler when it runs with
  ``profile_memory=True``. The raw kineto events (``prof.profiler.kineto_results.events()``, name
  ``[memory]``, signed ``nbytes()``) replayed in time order give the live-bytes curve and its peak.
  (``prof.events()`` is no good for this: it attributes most allocations to their operator and keeps only
  frees as ``[memory]`` rows; ``tracemalloc`` and RSS do not see torch's allocator precisely.)
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch


@dataclass
class Measurement:
    peak_bytes: int  #: peak allocated above parameters + gradients during the step
    device: str
    dtype: str


def _checkpoint_fn(function, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False)


def cpu_peak_bytes(step) -> int:
    """Peak of CPU bytes allocated by torch while ``step()`` runs, relative to its start."""
    from torch.profiler import ProfilerActivity, profile

    # kineto prints "USDT: ... profiler_start" / "profiler_stop" at its highest log level on every profile;
    # the profiler only counts allocations here, so it stays silent unless the user set a level
    quiet = "KINETO_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["KINETO_LOG_LEVEL"] = "6"
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        if quiet:
            os.environ.pop("KINETO_LOG_LEVEL", None)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and "CPU" in str(e.device_type())
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_activation_peak(
    model_cfg,
    batch_size: int,
    src_len: int,
    tgt_len: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    checkpointing: str = "off",
    label_smoothing: float = 0.1,
    device: str = "cpu",
    seed: int = 0,
) -> Measurement:
    """Build the model from ``model_cfg``, run one warm-up step (so gradients exist), then measure one."""
    from ..engine import label_smoothed_nll_loss
    from ..model import PyramidionModel

    cfg = copy.deepcopy(model_cfg)
    torch.manual_seed(seed)
    model = PyramidionModel(cfg).to(device=device, dtype=dtype).train()
    model.set_activation_checkpointing(_checkpoint_fn if checkpointing != "off" else None, checkpointing)
    low = max(cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.unk_id) + 1
    src = torch.randint(low, cfg.vocab_size, (batch_size, src_len), device=device)
    prev = torch.randint(low, cfg.vocab_size, (batch_size, tgt_len), device=device)
    target = torch.randint(low, cfg.vocab_size, (batch_size, tgt_len), device=device)
    lengths = torch.full((batch_size,), src_len, device=device)

    def step():
        logits = model(src, lengths, prev)
        loss, _ = label_smoothed_nll_loss(logits, target, label_smoothing, cfg.pad_id)
        loss.backward()

    step()  # gradients now exist and are accumulated into in place from here on
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_bytes(step)
    return Measurement(int(peak), device, str(dtype).replace("torch.", ""))
