"""The training step under torch.compile: one graph per shape (no breaks), the eager numbers, and a
bounded number of shapes per epoch of token-budget batches.

A graph break anywhere makes ``fullgraph=True`` raise. ``backend="aot_eager"`` traces forward *and*
backward (AOTAutograd) as inductor does, without generating code; it runs for the pyramidion variant,
whose top-k has its own autograd.Function. The other variants share every module with it and differ only
in widths and chunking, so they are traced by Dynamo alone (``backend="eager"``, half the time).
"""
from __future__ import annotations

import pytest
import torch

from pyramidion_ds.config.model import ModelConfig
from pyramidion_ds.engine.optim import label_smoothed_nll_loss
from pyramidion_ds.model import PyramidionModel

VOCAB = 50


def _model(variant, dropout=0.0):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", variant=variant, vocab_size=VOCAB, dropout=dropout)
    cfg.validate()
    return PyramidionModel(cfg).train()


def _batch(lengths, tgt_len=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = max(lengths)
    src = torch.randint(4, VOCAB, (len(lengths), n), generator=generator)
    src_lengths = torch.tensor(lengths)
    src[torch.arange(n).unsqueeze(0) >= src_lengths.unsqueeze(1)] = 1
    prev = torch.randint(4, VOCAB, (len(lengths), tgt_len), generator=generator)
    target = torch.randint(4, VOCAB, (len(lengths), tgt_len), generator=generator)
    target[-1, tgt_len // 2:] = 1
    return src, src_lengths, prev, target


def training_loss(model, src, src_lengths, prev, target):
    """What the trainer computes per micro-batch: forward + label-smoothed loss (a scalar)."""
    logits = model(src, src_lengths, prev)
    loss, _ = label_smoothed_nll_loss(logits, target, 0.1, model.cfg.pad_id)
    return loss


@pytest.mark.parametrize("variant, backend", [("vanilla", "eager"), ("blockwise", "eager"),
                                              ("transpooler", "eager"), ("pyramidion", "aot_eager")])
def test_training_step_compiles_to_one_graph_with_eager_numerics(variant, backend):
    model = _model(variant)
    batch = _batch([512, 300])  # padded and unpadded rows: the masked path
    eager = training_loss(model, *batch)
    eager.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    compiled = torch.compile(training_loss, backend=backend, fullgraph=True, dynamic=False)
    loss = compiled(model, *batch)  # fullgraph=True raises on any graph break
    loss.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-5)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], rtol=1e-4, atol=1e-5), name


def test_unpadded_batch_and_dropout_compile_without_breaks():
    """No padding (eager skips the attention mask after a host sync) and dropout on: still one graph."""
    model = _model("pyramidion", dropout=0.1)
    torch._dynamo.reset()
    loss = torch.compile(training_loss, backend="eager", fullgraph=True, dynamic=False)(model, *_batch([512, 512]))
    loss.backward()
    assert torch.isfinite(loss)
