"""Launch budget: the aten operators one ``base``-shaped training forward+backward dispatches.

On a GPU the step is host-bound when Python and the dispatcher issue kernels more slowly than the GPU
runs them (each operator costs microseconds of host time, a view included). The count of operators
dispatched is a CPU-checkable proxy, so host overhead cannot creep back unnoticed: a change that adds
operators must raise the budget below on purpose (and say why in its commit).

The model is ``base``'s structure (6 + 6 layers, 8 heads, the default halving schedule: five poolings)
at a small width and on a 1024-token input (``max_source_positions`` 1024, chunks of 64), so it runs in
seconds: the operator count depends on the structure, not on the widths.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyramidion_ds.config.model import ModelConfig
from pyramidion_ds.engine.optim import label_smoothed_nll_loss
from pyramidion_ds.model import PyramidionModel

#: measured 2,542 / 1,932 after fusing the attention projections (3,142 / 2,532 with separate q, k, v)
BUDGET_ALL_OPERATORS = {"pyramidion": 2560, "vanilla": 1950}
#: operators that are not views, each at least one kernel on a GPU: measured 1,030 / 750 (1,144 / 864 before)
BUDGET_KERNEL_OPERATORS = {"pyramidion": 1040, "vanilla": 760}

#: aten operators that only create a view (no kernel); ``is_view`` misses this one
ALIASES = {"aten._unsafe_view"}


class OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        if not func.is_view and str(func.overloadpacket) not in ALIASES:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def count_training_step(variant: str) -> OperatorCounter:
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="base",
        variant=variant,
        vocab_size=256,
        d_model=64,
        ffn_dim=128,
        max_source_positions=1024,
        chunk_size=64,
    )
    cfg.validate()
    model = PyramidionModel(cfg).train()
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, 256, (2, 1024), generator=generator)
    src[1, 700:] = cfg.pad_id
    src_lengths = torch.tensor([1024, 700])
    prev = torch.randint(4, 256, (2, 32), generator=generator)
    target = torch.randint(4, 256, (2, 32), generator=generator)
    with OperatorCounter() as counter:
        loss, _ = label_smoothed_nll_loss(model(src, src_lengths, prev), target, 0.1, cfg.pad_id)
        loss.backward()
    return counter


def test_base_training_step_stays_within_its_launch_budget():
    for variant in ("pyramidion", "vanilla"):
        counter = count_training_step(variant)
        total = sum(counter.ops.values())
        top = ", ".join(f"{name} {count}" for name, count in counter.ops.most_common(8))
        assert total <= BUDGET_ALL_OPERATORS[variant], f"{variant}: {total} operators dispatched ({top})"
        assert counter.kernels <= BUDGET_KERNEL_OPERATORS[variant], (
            f"{variant}: {counter.kernels} kernel-launching operators ({top})"
        )
