"""Launch budget: the aten operators one ``base``-shaped training forward+backward dispatches.

On a GPU the step is host-bound when Python and the dispatcher issue kernels more slowly than the GPU
runs them (each operator costs microseconds of host time, a view included). The count of operators
dispatched is a CPU-checkable proxy, so host overhead cannot creep back unnoticed: a change that adds
operators must raise the budget below on purpose (and say why in its commit).

The model is ``base``'s structure (6 + 6 layers, 8 heads, the default halving schedule: five poolings)
at a small width and on a 1024-token input (``max_source_positions`` 1024, chunks of 64), so it runs in
seconds: the operator count depends on the structure, not on the widths.

The pyramidion is counted as it runs on a GPU, with the Triton top-k (in Triton's interpreter, in a child
process: ``TRITON_INTERPRET=1`` must be set before triton is imported); its kernel launches count beside its
operators. It dispatches less than vanilla (issue 24, item 3): it does the same layers and adds five
poolings, paid for by what vanilla does and it does not: stages narrower than the fewest real tokens of the
batch, and the decoder's cross-attention after them, run with no attention mask at all. That leaves each
pooling about 13 operators and launches, forward and backward; the fused scorer + top-k (``score_pool``)
takes 9 + 4 for a single round.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyramidion_ds.config.model import ModelConfig
from pyramidion_ds.engine.optim import label_smoothed_nll_loss
from pyramidion_ds.model import PyramidionModel

#: torch top-k path: measured 2,542 / 1,932 after fusing the attention projections (3,142 / 2,532 with
#: separate q, k, v). Triton top-k (interpreted): pyramidion 2,147 operators + 20 launches, then 2,082 + 20
#: once unpadded stages and cross-attention dropped their masks, 2,092 + 25 with the per-round plan kernels,
#: 2,045 + 20 with the top-k's workspaces and single-round plan, 2,110 + 20 with the centred scorer; 1,910 + 20
#: with the scorer fused into the top-k (score_pool: one workspace, statistics read on demand, a single round
#: mixing and taking dW in its plan kernels), against vanilla's 1,931 (docs/performance.md, "Launch budgets")
BUDGET_ALL_OPERATORS = {"pyramidion": 1915, "vanilla": 1950}
#: operators that are not views, each at least one kernel on a GPU: measured 743 / 750 with the fused scorer
#: (867 before it; 1,030 / 750 on the torch path, 1,144 / 864 with separate q, k, v)
BUDGET_KERNEL_OPERATORS = {"pyramidion": 750, "vanilla": 760}

#: aten operators that only create a view (no kernel); ``is_view`` misses this one
ALIASES = {"aten._unsafe_view"}


class OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from pyramidion_ds.model import topk_triton

        if topk_triton.launching:  # the interpreter's own operators inside a Triton kernel
            return func(*args, **(kwargs or {}))
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


def main():
    """Child process (TRITON_INTERPRET=1, PYRAMIDION_TOPK=triton): both variants' counts as one JSON line."""
    from pyramidion_ds.model import topk_triton

    assert topk_triton.interpreted(), "run with TRITON_INTERPRET=1 set before triton is imported"
    report = {}
    for variant in ("pyramidion", "vanilla"):
        before = topk_triton.launch_count
        counter = count_training_step(variant)
        report[variant] = {
            "operators": sum(counter.ops.values()),
            "kernels": counter.kernels,
            "launches": topk_triton.launch_count - before,
            "top": counter.ops.most_common(8),
        }
    print(json.dumps(report))


@pytest.fixture(scope="module")
def counts():
    from interpreted import run_interpreted  # (tests/unit; not imported by the child)

    report = run_interpreted("tests.unit.test_launch_budget", PYRAMIDION_TOPK="triton")
    print(json.dumps({variant: {k: v for k, v in r.items() if k != "top"} for variant, r in report.items()}))
    return report


def test_base_training_step_stays_within_its_launch_budget(counts):
    for variant, count in counts.items():
        top = ", ".join(f"{name} {n}" for name, n in count["top"])
        assert count["operators"] <= BUDGET_ALL_OPERATORS[variant], (
            f"{variant}: {count['operators']} operators dispatched ({top})"
        )
        assert count["kernels"] <= BUDGET_KERNEL_OPERATORS[variant], (
            f"{variant}: {count['kernels']} kernel-launching operators ({top})"
        )


def test_pyramidion_dispatches_less_than_vanilla(counts):
    """Fails on the code before the fused scorer: 2,110 operators + 20 launches against vanilla's 1,933."""
    pyramidion, vanilla = counts["pyramidion"], counts["vanilla"]
    assert pyramidion["operators"] + pyramidion["launches"] < vanilla["operators"] + vanilla["launches"], (
        f"pyramidion {pyramidion['operators']} operators + {pyramidion['launches']} Triton launches, "
        f"vanilla {vanilla['operators']} + {vanilla['launches']}"
    )
