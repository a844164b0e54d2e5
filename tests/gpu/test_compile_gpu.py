"""The training step compiled on CUDA: inductor, and inductor with CUDA graphs (``reduce-overhead``),
give eager's loss and gradients (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from pyramidion_ds.config.model import ModelConfig
from pyramidion_ds.engine.optim import label_smoothed_nll_loss
from pyramidion_ds.model import PyramidionModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def training_loss(model, src, src_lengths, prev, target):
    loss, _ = label_smoothed_nll_loss(model(src, src_lengths, prev), target, 0.1, model.cfg.pad_id)
    return loss


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_step_matches_eager_on_cuda(mode):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", variant="pyramidion", vocab_size=64, dropout=0.0)
    model = PyramidionModel(cfg).cuda().train()
    src = torch.randint(4, 64, (4, 512), device="cuda")
    src[1, 300:] = cfg.pad_id
    src_lengths = src.ne(cfg.pad_id).sum(1)
    prev = torch.randint(4, 64, (4, 32), device="cuda")
    target = torch.randint(4, 64, (4, 32), device="cuda")
    eager = training_loss(model, src, src_lengths, prev, target)
    eager.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch._dynamo.reset()
    compiled = torch.compile(training_loss, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
    for _ in range(3):  # reduce-overhead records its CUDA graph on a later call, then replays it
        model.zero_grad(set_to_none=True)
        loss = compiled(model, src, src_lengths, prev, target)
        loss.backward()
        torch.testing.assert_close(loss.detach().clone(), eager.detach(), rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-4, msg=name)
