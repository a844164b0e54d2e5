"""The model and the top-k on CUDA (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from pyramidion_ds.config.model import ModelConfig
from pyramidion_ds.model import PyramidionModel, successive_halving_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("n,k", [(8192, 2048), (1000, 300)])
def test_topk_cuda_matches_cpu(n, k):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, n, 32, generator=generator, dtype=torch.float64)
    scores = torch.rand(4, n, generator=generator, dtype=torch.float64)
    mask = torch.ones(4, n, dtype=torch.bool)
    mask[1, n // 3:] = False
    outputs = []
    for device in ("cpu", "cuda"):
        xs = x.detach().to(device).requires_grad_(True)
        ss = scores.detach().to(device).requires_grad_(True)
        out = successive_halving_topk(xs, ss, k, mask=mask.to(device), sort_back=True)
        (out.values.square().sum() + out.scores.sum()).backward()
        outputs.append([t.cpu() for t in (out.values, out.scores, out.source_index, xs.grad, ss.grad)])
    for cpu, cuda in zip(*outputs):
        torch.testing.assert_close(cuda, cpu)


def test_model_bf16_autocast_and_incremental_decoding():
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", variant="pyramidion", vocab_size=64, dropout=0.0)
    model = PyramidionModel(cfg).cuda()
    src = torch.randint(4, 64, (2, 512), device="cuda")
    src[1, 300:] = cfg.pad_id
    prev = torch.randint(4, 64, (2, 8), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(src, None, prev)
        logits.float().logsumexp(-1).mean().backward()
    assert torch.isfinite(logits).all()
    model.eval()
    with torch.no_grad():
        full = model(src, None, prev)
        encoder_out = model.encode(src)
        cache = model.new_cache()
        steps = torch.stack([model.decode_step(prev[:, :t + 1], encoder_out, cache) for t in range(8)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-3)


def test_cuda_graph_decoding_equals_eager():
    """Replayed steps (and a recapture after a source finishes) give the growing cache's logits."""
    from pyramidion_ds.generate.cuda_graph import GraphedDecodeStep
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", variant="pyramidion", vocab_size=64, dropout=0.0)
    model = PyramidionModel(cfg).cuda().eval()
    src = torch.randint(4, 64, (2, 512), device="cuda")
    src[1, 300:] = cfg.pad_id
    beam = 3
    rows = torch.randint(4, 64, (2 * beam, 8), device="cuda")
    with torch.no_grad():
        encoder_out = model.encode(src)
        growing, static = model.new_cache(), model.new_static_cache(encoder_out, rows.size(0), 8)
        graphed = GraphedDecodeStep(model)
        order = torch.tensor([2, 0, 0, 4, 5, 3], device="cuda")
        for t in range(5):
            expected = model.decode_step(rows[:, :t + 1], encoder_out, growing)
            torch.testing.assert_close(graphed(rows[:, :t + 1], encoder_out, static), expected, atol=1e-4, rtol=1e-3)
            rows = rows[order]
            growing.reorder(order)
            static.reorder(order)
        keep = torch.tensor([1], device="cuda")
        for cache in (growing, static):
            cache.reorder(torch.tensor([3, 4, 5], device="cuda"))
            cache.select_sources(keep)
        rows, encoder_out = rows[3:], encoder_out.select(keep)
        for t in range(5, 8):
            expected = model.decode_step(rows[:, :t + 1], encoder_out, growing)
            torch.testing.assert_close(graphed(rows[:, :t + 1], encoder_out, static), expected, atol=1e-4, rtol=1e-3)
    assert graphed.captures == 2


def test_cuda_graph_generation_equals_dynamic_cache():
    from pyramidion_ds.generate.search import SearchOptions, generate
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", variant="pyramidion", vocab_size=64, dropout=0.0)
    model = PyramidionModel(cfg).cuda().eval()
    src = torch.randint(4, 64, (3, 512), device="cuda")
    lengths = torch.tensor([512, 300, 100], device="cuda")
    out = [generate(model, src, lengths, SearchOptions(beam=4, nbest=2, max_len_a=0.05, max_len_b=4, cuda_graph=graph))
           for graph in (False, True)]
    assert [[h.tokens for h in s] for s in out[1]] == [[h.tokens for h in s] for s in out[0]]
