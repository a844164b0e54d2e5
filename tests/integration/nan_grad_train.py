"""pyramidion-train with a NaN put into one gradient on chosen updates (run under the DeepSpeed launcher).

    NAN_GRAD_ATTEMPTS=2,4,5,6   1-based update attempts whose backward gets a NaN (skipped ones count too)
    NAN_GRAD_RANK=1             the only rank whose gradient is poisoned (the others must skip as well)
    NAN_GRAD_REPORT=DIR         each rank writes DIR/rank{R}.json: per poisoned attempt, whether its model
                                weights, optimizer parameters, optimizer state and LR stayed bit for bit

The fault goes in through a hook on one parameter's gradient, in backward, before DeepSpeed reduces
and partitions it; everything else is the real trainer (pyramidion_ds.cli.train's main).
"""

import json
import os
from pathlib import Path

import torch

from pyramidion_ds.cli.train import main
from pyramidion_ds.train import trainer as trainer_module

POISON = {int(x) for x in os.environ["NAN_GRAD_ATTEMPTS"].split(",")}
POISON_RANK = int(os.environ.get("NAN_GRAD_RANK", "1"))
REPORT = Path(os.environ["NAN_GRAD_REPORT"])


def snapshot(trainer) -> list[torch.Tensor]:
    """This rank's weights (its ZeRO-3 partition), the optimizer's fp32 parameters and state, the LR."""
    tensors = [getattr(p, "ds_tensor", p).detach().clone() for p in trainer.model.parameters()]
    inner = trainer.engine.optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    for group in inner.param_groups:
        tensors.append(torch.tensor([group["lr"]], dtype=torch.float64))
        for param in group["params"]:
            tensors.append(param.detach().clone())
            tensors.extend(v.detach().clone() for v in inner.state.get(param, {}).values() if torch.is_tensor(v))
    return tensors


original_setup = trainer_module.Trainer.setup


def setup(self):
    original_setup(self)
    attempt = [1]
    name, param = next((n, p) for n, p in self.model.named_parameters() if "decoder" in n and p.requires_grad)

    def poison(grad):
        if attempt[0] in POISON and self.rank == POISON_RANK:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad

    param.register_hook(poison)
    finish_update = self.finish_update
    results = {}

    def checked_finish_update(meters, pending):
        before = snapshot(self) if attempt[0] in POISON else None
        outcome = finish_update(meters, pending)
        if before is not None:
            after = snapshot(self)
            results[attempt[0]] = {
                "skipped": outcome[0],
                "unchanged": len(before) == len(after)
                and all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
                "tensors": len(before),
                "param": name,
            }
            REPORT.mkdir(parents=True, exist_ok=True)
            (REPORT / f"rank{self.rank}.json").write_text(json.dumps(results))
        attempt[0] += 1
        return outcome

    self.finish_update = checked_finish_update


trainer_module.Trainer.setup = setup

if __name__ == "__main__":
    main()
