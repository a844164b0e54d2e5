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
    mask[1, n // 3 :] = False
    outputs = []
    for device in ("cpu", "cuda"):
        xs = x.detach().to(device).requires_grad_(True)
        ss = scores.detach().to(device).requires_grad_(True)
        out = successive_halving_topk(xs, ss, k, mask=mask.to(device), sort_back=True)
        (out.values.square().sum() + out.scores.sum()).backward()
        outputs.append([t.cpu() for t in (out.values, out.scores, out.source_index, xs.grad, ss.grad)])
    for cpu, cuda in zip(*outputs, strict=True):
        torch.testing.assert_close(cuda, cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n,k,sort_back,flip_right",
    # 65536: past the 32k lanes the one-program-per-row kernels could not launch (issue #24)
    [(8192, 2048, False, True), (1000, 300, True, True), (4096, 100, True, False), (65536, 16384, True, True)],
)
def test_topk_triton_matches_torch_path(monkeypatch, dtype, n, k, sort_back, flip_right):
    """The Triton kernels against the torch path on CUDA: same pairing, values and gradients."""
    from pyramidion_ds.model import topk_triton

    if not topk_triton.AVAILABLE:
        pytest.skip("triton does not import")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, n, 64, generator=generator).to("cuda", dtype)
    # scores on a 1/32 grid: later rounds rank mixed scores, which the two paths compute with different exp
    # implementations (ulps apart); with few distinct pairs, equal mixes tie exactly in both paths (and go by
    # position) while distinct ones stay far more than an ulp apart, so the pairing must agree exactly
    scores = ((torch.rand(4, n, generator=generator) * 32).ceil() / 32).cuda()
    mask = torch.ones(4, n, dtype=torch.bool, device="cuda")
    mask[1, n // 3 :] = False
    mask[2, n - 7 :] = False
    grad_values = torch.randn(4, k, 64, generator=generator).to("cuda", dtype)
    grad_scores = torch.randn(4, k, generator=generator).cuda()
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PYRAMIDION_TOPK", backend)
        xs, ss = x.detach().requires_grad_(True), scores.detach().requires_grad_(True)
        launches = topk_triton.launch_count
        out = successive_halving_topk(xs, ss, k, mask=mask, sort_back=sort_back, flip_right=flip_right)
        torch.autograd.backward([out.values, out.scores], [grad_values, grad_scores])
        outputs[backend] = (out, xs.grad, ss.grad, topk_triton.launch_count - launches)
    (ref, ref_gx, ref_gs, _), (tri, tri_gx, tri_gs, launches) = outputs["torch"], outputs["triton"]
    assert launches == topk_triton.launches_per_call(n, k)
    assert torch.equal(tri.source_index, ref.source_index) and torch.equal(tri.mask, ref.mask)
    # bf16: the torch path rounds the mixing weights to bf16, the kernels mix in float32
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(tri.values.float(), ref.values.float(), **tol)
    torch.testing.assert_close(tri.scores, ref.scores, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tri_gx.float(), ref_gx.float(), **tol)
    scale = ref_gs.abs().max().item()
    assert (tri_gs - ref_gs).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2e-2) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,sort_back", [(8192, 4096, False), (1000, 500, True), (65536, 32768, False)])
def test_fused_scorer_matches_torch_path(monkeypatch, dtype, n, k, sort_back):
    """The encoder's pooling (score_and_pool) fused into the Triton kernels against its torch operators on CUDA,
    one round (the halving schedule's): same pairing, values and gradients of x and the scorer's weight."""
    from pyramidion_ds.model import topk_triton
    from pyramidion_ds.model.topk import score_and_pool

    if not topk_triton.AVAILABLE:
        pytest.skip("triton does not import")
    generator = torch.Generator().manual_seed(0)
    # x in {-1, 0, 1} and w on a 1/2 grid: every logit is exact in both paths (bf16 too), so the ranking, which
    # is by logit, agrees exactly; ties go by position in both
    x = torch.randint(-1, 2, (4, n, 64), generator=generator).to("cuda", dtype)
    weight = (torch.randint(-2, 3, (1, 64), generator=generator) / 2).to("cuda", dtype)
    mask = torch.ones(4, n, dtype=torch.bool, device="cuda")
    mask[1, n // 3 :] = False
    grad_values = torch.randn(4, k, 64, generator=generator).to("cuda", dtype)
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PYRAMIDION_TOPK", backend)
        xs, ws = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        launches = topk_triton.launch_count
        out = score_and_pool(xs, ws, None, mask, k, centre=True, sort_back=sort_back)
        out.values.backward(grad_values)
        outputs[backend] = (out, xs.grad, ws.grad, topk_triton.launch_count - launches)
    (ref, ref_gx, ref_gw, _), (fused, fused_gx, fused_gw, launches) = outputs["torch"], outputs["triton"]
    assert launches == topk_triton.launches_per_call(n, k, scorer=True) == 4
    assert torch.equal(fused.source_index, ref.source_index) and torch.equal(fused.mask, ref.mask)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(fused.values.float(), ref.values.float(), **tol)
    torch.testing.assert_close(fused.scores[mask], ref.scores[mask].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_gx.float(), ref_gx.float(), **tol)
    scale = ref_gw.float().abs().max().item()
    assert (fused_gw.float() - ref_gw.float()).abs().max().item() <= (1e-4 if dtype == torch.float32 else 3e-2) * scale


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
        steps = torch.stack([model.decode_step(prev[:, : t + 1], encoder_out, cache) for t in range(8)], dim=1)
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
            expected = model.decode_step(rows[:, : t + 1], encoder_out, growing)
            torch.testing.assert_close(graphed(rows[:, : t + 1], encoder_out, static), expected, atol=1e-4, rtol=1e-3)
            rows = rows[order]
            growing.reorder(order)
            static.reorder(order)
        keep = torch.tensor([1], device="cuda")
        for cache in (growing, static):
            cache.reorder(torch.tensor([3, 4, 5], device="cuda"))
            cache.select_sources(keep)
        rows, encoder_out = rows[3:], encoder_out.select(keep)
        for t in range(5, 8):
            expected = model.decode_step(rows[:, : t + 1], encoder_out, growing)
            torch.testing.assert_close(graphed(rows[:, : t + 1], encoder_out, static), expected, atol=1e-4, rtol=1e-3)
    assert graphed.captures == 2


def test_cuda_graph_generation_equals_dynamic_cache():
    from pyramidion_ds.generate.search import SearchOptions, generate

    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", variant="pyramidion", vocab_size=64, dropout=0.0)
    model = PyramidionModel(cfg).cuda().eval()
    src = torch.randint(4, 64, (3, 512), device="cuda")
    lengths = torch.tensor([512, 300, 100], device="cuda")
    out = [
        generate(model, src, lengths, SearchOptions(beam=4, nbest=2, max_len_a=0.05, max_len_b=4, cuda_graph=graph))
        for graph in (False, True)
    ]
    assert [[h.tokens for h in s] for s in out[1]] == [[h.tokens for h in s] for s in out[0]]
