"""The training step under torch.compile: one graph per shape (no breaks), the eager numbers, and a
bounded number of shapes per epoch of token-budget batches.

A graph break anywhere makes ``fullgraph=True`` raise. ``backend="aot_eager"`` traces forward *and*
backward (AOTAutograd) as inductor does, without generating code; it runs for the pyramidion variant,
whose top-k has its own autograd.Function. The other variants share every module with it and differ only
in widths and chunking, so they are traced by Dynamo alone (``backend="eager"``, half the time).
"""

from __future__ import annotations

import dataclasses

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


def _small_pyramidion():
    """Two encoder layers over 256 tokens pooling to 128 then 32 (chunks of 64), one decoder layer."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="debug",
        variant="pyramidion",
        vocab_size=VOCAB,
        dropout=0.0,
        encoder_layers=2,
        decoder_layers=1,
        max_source_positions=256,
        pooling_schedule=[128, 32],
        chunk_size=64,
    )
    return PyramidionModel(cfg)


def _batch(lengths, tgt_len=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = max(lengths)
    src = torch.randint(4, VOCAB, (len(lengths), n), generator=generator)
    src_lengths = torch.tensor(lengths)
    src[torch.arange(n).unsqueeze(0) >= src_lengths.unsqueeze(1)] = 1
    prev = torch.randint(4, VOCAB, (len(lengths), tgt_len), generator=generator)
    target = torch.randint(4, VOCAB, (len(lengths), tgt_len), generator=generator)
    target[-1, tgt_len // 2 :] = 1
    return src, src_lengths, prev, target


def training_loss(model, src, src_lengths, prev, target):
    """What the trainer computes per micro-batch: forward + label-smoothed loss (a scalar)."""
    logits = model(src, src_lengths, prev)
    loss, _ = label_smoothed_nll_loss(logits, target, 0.1, model.cfg.pad_id)
    return loss


@pytest.mark.parametrize(
    "variant, backend",
    [("vanilla", "eager"), ("blockwise", "eager"), ("transpooler", "eager"), ("pyramidion", "aot_eager")],
)
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


def _attention_calls(graph_module):
    """The attention operators of a Dynamo graph: ("flex", None) or ("sdpa", whether a mask is passed)."""
    calls = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if "flex_attention" in str(node.target):
            calls.append(("flex", None))
        elif "scaled_dot_product_attention" in str(node.target):
            calls.append(("sdpa", node.kwargs.get("attn_mask") is not None))
    return calls


def test_compiled_encoder_keeps_a_fused_attention_with_padding_and_no_mask_without():
    """Issue 24 item 4: a padded batch's compiled encoder runs FlexAttention (a block mask holding the chunks
    and the padding), not SDPA with a mask (which rules out FlashAttention); a batch the caller declares
    unpadded (``padded=False``) compiles a graph of its own with no mask anywhere. Outputs equal eager."""
    model = _small_pyramidion().eval()
    cfg = model.cfg
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def encode(model, src, src_lengths, padded=None):
        out = model.encode(src, src_lengths, padded)
        return out.hidden, out.mask

    torch._dynamo.reset()
    compiled = torch.compile(encode, backend=recording_backend, fullgraph=True, dynamic=False)
    src, src_lengths, _, _ = _batch([256, 150])  # FlexAttention has no CPU backward: a forward graph here
    full, full_lengths, _, _ = _batch([256, 256], seed=1)
    with torch.no_grad():
        padded_out, padded_eager = compiled(model, src, src_lengths), encode(model, src, src_lengths)
        assert _attention_calls(graphs[-1]) == [("flex", None)] * cfg.encoder_layers
        unpadded_out = compiled(model, full, full_lengths, False)
        assert _attention_calls(graphs[-1]) == [("sdpa", False)] * cfg.encoder_layers
        unpadded_eager = encode(model, full, full_lengths)
    assert len(graphs) == 2
    for got, want in ((padded_out, padded_eager), (unpadded_out, unpadded_eager)):
        assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-5) and torch.equal(got[1], want[1])


def test_cross_attention_runs_unmasked_once_pooling_leaves_no_padding():
    """A stage narrower than the batch's fewest real tokens has no padding (padding ranks last in the
    top-k): its layers and the decoder's cross-attention run with no mask, with the same outputs."""
    model = _model("pyramidion")
    src, src_lengths, prev, _ = _batch([512, 300])  # pooled to 256 < 300: no padding after the first stage
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask is not None)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    with torch.no_grad():
        out = model.encode(src, src_lengths)
        assert not out.padded and out.attention_mask is None and bool(out.mask.all())
        torch.nn.functional.scaled_dot_product_attention = recording_sdpa
        try:
            logits = model(src, src_lengths, prev)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        stages = model.encoder.stages(src.size(1))
        assert masks[: len(stages[0].layers)] == [True] * len(stages[0].layers)
        assert not any(masks[len(stages[0].layers) :]), masks
        masked = model.decoder(model.embed_tokens(prev), dataclasses.replace(out, padded=True))
        assert torch.allclose(model.embed_tokens(masked, project=True), logits, rtol=1e-5, atol=1e-5)


def _epoch_batches(src_sizes, tgt_sizes, multiple, target_multiple):
    from pyramidion_ds.data.batching import make_batches, pad_target
    from pyramidion_ds.data.dataset import collate

    generator = torch.Generator().manual_seed(0)
    for indices in make_batches(
        src_sizes, max_tokens=1024, pad_to_multiple=64, seed=0, epoch=0, required_batch_size_multiple=multiple
    ):
        samples = [
            {
                "id": i,
                "source": torch.randint(4, VOCAB, (src_sizes[i],), generator=generator),
                "target": torch.randint(4, VOCAB, (tgt_sizes[i],), generator=generator),
            }
            for i in indices
        ]
        yield pad_target(collate(samples, pad_id=1, bos_id=0, eos_id=2, pad_to_multiple=64), target_multiple, 1)


def test_an_epoch_of_bucketed_batches_compiles_a_bounded_number_of_graphs():
    """One epoch of token-budget batches, compiled with static shapes: one graph per bucketed shape, and
    the number of shapes stays under the bound the buckets give (without buckets: one per batch, nearly)."""
    from pyramidion_ds.data.batching import shape_bound

    rng = torch.Generator().manual_seed(3)
    src_sizes = torch.randint(20, 257, (60,), generator=rng).tolist()
    tgt_sizes = torch.randint(3, 100, (60,), generator=rng).tolist()
    model = _small_pyramidion().train()
    cfg = model.cfg

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(training_loss, backend=counting_backend, fullgraph=True, dynamic=False)
    shapes, batches = set(), 0
    for batch in _epoch_batches(src_sizes, tgt_sizes, multiple=8, target_multiple=64):
        compiled(
            model, batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"], batch["target"]
        ).backward()
        shapes.add((*batch["src_tokens"].shape, batch["target"].size(1)))
        batches += 1
    bound = shape_bound(1024, None, 256, 64, 8, cfg.max_target_positions, 64)
    assert len(graphs) == len(shapes) <= bound
    unbucketed = {(*b["src_tokens"].shape, b["target"].size(1)) for b in _epoch_batches(src_sizes, tgt_sizes, 1, 1)}
    assert len(shapes) < len(unbucketed)
    print(f"{batches} batches, {len(shapes)} graphs (bound {bound}); without buckets {len(unbucketed)} shapes")


def test_bucketed_batches_keep_the_budget_and_every_example_once():
    from pyramidion_ds.data.batching import bucket_batch_size, make_batches, padded_length

    assert [bucket_batch_size(n, 8) for n in (1, 3, 5, 7, 8, 13, 16, 23, 24)] == [1, 2, 4, 4, 8, 8, 16, 16, 24]
    rng = torch.Generator().manual_seed(0)
    src_sizes = torch.randint(1, 1025, (500,), generator=rng).tolist()
    batches = make_batches(
        src_sizes, max_tokens=8192, pad_to_multiple=64, seed=1, epoch=2, required_batch_size_multiple=8
    )
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) * padded_length(max(src_sizes[i] for i in b), 64) <= 8192
        assert bucket_batch_size(len(b), 8) == len(b)
    plain = make_batches(src_sizes, max_tokens=8192, pad_to_multiple=64, seed=1, epoch=2)
    assert plain == make_batches(
        src_sizes, max_tokens=8192, pad_to_multiple=64, seed=1, epoch=2, required_batch_size_multiple=1
    )
    assert len({len(b) for b in batches}) < len({len(b) for b in plain})
