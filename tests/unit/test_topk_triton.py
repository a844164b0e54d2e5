"""The Triton top-k kernels, run by Triton's interpreter on CPU tensors, against the torch path.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton is first imported, and in a pytest
process something else (torch.compile, the model) may have imported it already; so all interpreted
work runs once in a child process (:func:`main`), which prints one JSON line that the tests read.
What needs no kernel to run (the launch grids of a shape, the fallback of an unsupported shape) runs in
the test process on meta tensors. Compiling the kernels for sm_80 and sm_90: ``test_topk_compile.py``.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

#: (batch, n, k, d) and options; small so that the interpreter finishes in seconds
CASES = {
    "padding_two_rounds": dict(batch=3, n=16, k=4, d=5),
    "partial_round": dict(batch=3, n=12, k=5, d=4),
    "partial_sort_back": dict(batch=3, n=12, k=5, d=4, sort_back=True),
    "three_rounds_no_flip": dict(batch=2, n=33, k=6, d=3, flip_right=False),
    "three_rounds_sort_back_no_flip": dict(batch=2, n=33, k=6, d=3, flip_right=False, sort_back=True),
    "down_to_one": dict(batch=2, n=9, k=1, d=3),
    "no_padding": dict(batch=2, n=10, k=3, d=4, pad=False),
    "ties": dict(batch=3, n=16, k=3, d=4, ties=True, sort_back=True),
    "ties_no_flip": dict(batch=2, n=20, k=7, d=3, ties=True, flip_right=False),
    "row_all_padding_but_one": dict(batch=2, n=8, k=3, d=3, one_real=True),
    "hard": dict(batch=2, n=12, k=5, d=3, hard=True, sort_back=True),
    "k_not_smaller": dict(batch=2, n=6, k=6, d=3),
    # a partial round whose 40 pass-through slots span two 32-pair blocks
    "pass_through_over_blocks": dict(batch=2, n=100, k=70, d=3),
    "pass_through_over_blocks_sort_back_no_flip": dict(batch=2, n=100, k=70, d=3, sort_back=True, flip_right=False),
    # d over one 128-column tile, n over one 8-row mix tile and several plan blocks, five rounds ending partial
    "wide_d_many_rounds": dict(batch=3, n=300, k=11, d=200, sort_back=True),
}
#: the encoder's pooling, score_and_pool: the scorer (Linear(d, 1), centred unless said, σ + 1e-5) and the top-k,
#: fused on the Triton path (one round: the mix and dW inside the plan kernels), against its torch operators
SCORED_CASES = {
    "single_round": dict(batch=3, n=16, k=8, d=5),
    "single_round_pass_through": dict(batch=3, n=12, k=7, d=4, sort_back=True),
    "single_round_wide": dict(batch=2, n=300, k=150, d=130),  # three scorer blocks, d over two 64-column steps
    "two_rounds_sort_back": dict(batch=3, n=16, k=4, d=5, sort_back=True),
    "three_rounds_no_flip": dict(batch=2, n=33, k=6, d=3, flip_right=False),
    "uncentred_single_round": dict(batch=3, n=16, k=8, d=5, centre=False),
    "uncentred_rounds": dict(batch=2, n=40, k=9, d=7, centre=False),
    "row_all_padding_but_one": dict(batch=2, n=8, k=4, d=3, one_real=True),
    "no_padding": dict(batch=2, n=10, k=5, d=4, pad=False),
    "wide_d_many_rounds": dict(batch=3, n=300, k=11, d=200, sort_back=True),
}
#: torch operators around score_pool's kernels, one round, forward + backward: values, the workspace, the
#: ranking key, the pooled mask, the sort; grad_x, the weight's gradient (a view and a sum), and autograd's
#: accumulation into the weight and into x (a detach each)
SCORED_DISPATCH_BUDGET = 10
#: torch operators dispatched around the kernels by one forward + backward at n=16 → k=4 (two rounds, soft):
#: per round a sort (and the key's view after the first), the one workspace, the outputs, the level-0 key,
#: grad_x and the scores' gradient, autograd's gradient accumulation, and the test's two gradients: 16 with
#: the cached -inf made (18 with a workspace of each dtype and a backward scratch, 24 before the workspaces)
TRITON_DISPATCH_BUDGET = 16


def case_inputs(batch, n, d, *, pad=True, ties=False, one_real=False, seed=0, **_):
    generator = torch.Generator().manual_seed(seed + n)
    x = torch.randn(batch, n, d, generator=generator)
    scores = torch.rand(batch, n, generator=generator) * 0.999 + 1e-3
    if ties:  # few distinct values: many exact ties in the first round and after
        scores = (scores * 3).ceil() / 4
    lengths = torch.randint(1, n + 1, (batch,), generator=generator) if pad else torch.full((batch,), n)
    lengths[0] = n
    if one_real:
        lengths[-1] = 1
    mask = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
    return x, scores, mask


def _run_case(name, spec):
    from pyramidion_ds.model import topk, topk_triton

    try:
        x, scores, mask = case_inputs(**spec)
        options = dict(
            flip_right=spec.get("flip_right", True),
            sort_back=spec.get("sort_back", False),
            hard=spec.get("hard", False),
            base=20.0,
        )
        results = {}
        for backend in ("torch", "triton"):
            os.environ[topk.BACKEND_ENV] = backend
            for dtype in (torch.float32, torch.float64) if backend == "torch" else (torch.float32,):
                xs = x.detach().to(dtype).requires_grad_(True)
                ss = scores.detach().to(dtype).requires_grad_(True)
                before = topk_triton.launch_count
                out = topk.successive_halving_topk(xs, ss, spec["k"], mask=mask, **options)
                generator = torch.Generator().manual_seed(1)
                grads = [
                    torch.randn(out.values.shape, generator=generator).to(dtype),
                    torch.randn(out.scores.shape, generator=generator).to(out.scores.dtype),
                ]
                torch.autograd.backward([out.values, out.scores], grads)
                key = backend if dtype == torch.float32 else "float64"
                results[key] = dict(
                    values=out.values.detach().double(),
                    scores=out.scores.detach().double(),
                    mask=out.mask,
                    source_index=out.source_index,
                    grad_x=xs.grad.double(),
                    grad_scores=ss.grad.double(),
                    launches=topk_triton.launch_count - before,
                )
        torch_out, triton_out, exact = results["torch"], results["triton"], results["float64"]
        fields = ("values", "scores", "grad_x", "grad_scores")
        report = _differences(torch_out, triton_out, fields)
        for field in fields:
            report[field + "_torch_error"] = (torch_out[field] - exact[field]).abs().max().item()
            report[field + "_triton_error"] = (triton_out[field] - exact[field]).abs().max().item()
        return report
    finally:
        os.environ.pop("PYRAMIDION_TOPK", None)


def _differences(torch_out: dict, triton_out: dict, fields) -> dict:
    """Largest difference and the torch path's scale of each field; whether the pairing (mask, source_index)
    is the same; the Triton path's launches and source_index dtype."""
    report = {"launches": triton_out["launches"], "source_index_dtype": str(triton_out["source_index"].dtype)}
    for field in fields:
        report[field] = (torch_out[field] - triton_out[field]).abs().max().item()
        report[field + "_scale"] = torch_out[field].abs().max().item()
    for field in ("mask", "source_index"):
        report[field] = torch.equal(torch_out[field], triton_out[field])
    return report


def _count_dispatch(step):
    """Torch operators dispatched (not the interpreter's own inside a kernel) and Triton kernels launched by
    ``step()`` on the Triton path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyramidion_ds.model import topk, topk_triton

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not topk_triton.launching:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    os.environ[topk.BACKEND_ENV] = "triton"
    try:
        before = topk_triton.launch_count
        with Count() as counter:
            step()
        return {"kernels": topk_triton.launch_count - before, "ops": counter.ops}
    finally:
        os.environ.pop("PYRAMIDION_TOPK", None)


def _run_scored_case(name, spec):
    from pyramidion_ds.model import topk, topk_triton

    try:
        x, _, mask = case_inputs(**spec)
        d, centre = spec["d"], spec.get("centre", True)
        generator = torch.Generator().manual_seed(spec["n"] + 7)
        weight = torch.randn(1, d, generator=generator) * d**-0.5
        bias = None if centre else torch.randn(1, generator=generator)
        options = dict(flip_right=spec.get("flip_right", True), sort_back=spec.get("sort_back", False))
        results = {}
        for backend in ("torch", "triton"):
            os.environ[topk.BACKEND_ENV] = backend
            xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            bs = None if bias is None else bias.clone().requires_grad_(True)
            before = topk_triton.launch_count
            out = topk.score_and_pool(xs, ws, bs, mask, spec["k"], centre=centre, **options)
            out.values.backward(torch.randn(out.values.shape, generator=torch.Generator().manual_seed(1)))
            results[backend] = dict(
                values=out.values.detach(),
                pooled_scores=out.pooled_scores.detach(),
                scores=torch.where(mask, out.scores.detach(), 0.0),  # the fused path's padding scores are 0
                grad_x=xs.grad,
                grad_weight=ws.grad,
                grad_bias=torch.zeros(1) if bs is None else bs.grad,
                mask=out.mask,
                source_index=out.source_index,
                launches=topk_triton.launch_count - before,
                bias_grad_none=bs is None or bs.grad is None,
            )
        torch_out, triton_out = results["torch"], results["triton"]
        return _differences(
            torch_out, triton_out, ("values", "pooled_scores", "scores", "grad_x", "grad_weight", "grad_bias")
        )
    finally:
        os.environ.pop("PYRAMIDION_TOPK", None)


def _scored_dispatch():
    """One single-round score_pool forward + backward."""
    from pyramidion_ds.model import topk

    x, _, mask = case_inputs(batch=2, n=16, k=8, d=4)
    x.requires_grad_(True)
    weight = torch.full((1, 4), 0.5, requires_grad=True)
    grad = torch.ones(2, 8, 4)
    return _count_dispatch(lambda: topk.score_and_pool(x, weight, None, mask, 8, centre=True).values.backward(grad))


def _dispatch_counts():
    """One soft top-k forward + backward on the Triton path (16 → 4, two rounds)."""
    from pyramidion_ds.model import topk

    x, scores, mask = case_inputs(batch=2, n=16, k=4, d=4)
    x.requires_grad_(True)
    scores.requires_grad_(True)

    def step():
        out = topk.successive_halving_topk(x, scores, 4, mask=mask)
        torch.autograd.backward([out.values, out.scores], [torch.ones_like(out.values), torch.ones_like(out.scores)])

    return _count_dispatch(step)


def _opcheck():
    """torch.library.opcheck of the custom ops (schema, fake tensors, autograd registration)."""
    from pyramidion_ds.model import topk_triton

    x, scores, mask = case_inputs(batch=2, n=12, k=5, d=3)
    scores = torch.where(mask, scores, 0.0).requires_grad_(True)
    plan = topk_triton.topk_plan(scores, mask, 5, 20.0, True, False)
    results = {}
    checks = {
        "topk_plan": (topk_triton.topk_plan, (scores, mask, 5, 20.0, True, False)),
        "topk_mix": (
            topk_triton.topk_mix,
            (x.requires_grad_(True), plan[1].detach().requires_grad_(True), plan[0], plan[2]),
        ),
    }
    for name, (op, args) in checks.items():
        outcome = torch.library.opcheck(
            op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
        )
        results[name] = {test: str(value) for test, value in outcome.items()}
    return results


def _compiled():
    """torch.compile(fullgraph=True) over the dispatching function on the Triton path: largest differences."""
    from pyramidion_ds.model import topk

    os.environ[topk.BACKEND_ENV] = "triton"
    try:
        x, scores, mask = case_inputs(batch=2, n=12, k=5, d=3)
        outputs = []
        for fn in (
            topk.successive_halving_topk,
            torch.compile(topk.successive_halving_topk, backend="eager", fullgraph=True),
        ):
            xs, ss = x.clone().requires_grad_(True), scores.clone().requires_grad_(True)
            out = fn(xs, ss, 5, mask=mask, sort_back=True)
            (out.values.square().sum() + out.scores.sum()).backward()
            outputs.append((out.values, out.scores, xs.grad, ss.grad))
        return [(a - b).abs().max().item() for a, b in zip(*outputs, strict=True)]
    finally:
        os.environ.pop("PYRAMIDION_TOPK", None)


def main():
    """Child process (TRITON_INTERPRET=1): every case, the dispatch counts and opcheck, as one JSON line."""
    from pyramidion_ds.model import topk_triton

    assert topk_triton.interpreted(), "run with TRITON_INTERPRET=1 set before triton is imported"
    report = {
        "cases": {name: _run_case(name, spec) for name, spec in CASES.items()},
        "scored": {name: _run_scored_case(name, spec) for name, spec in SCORED_CASES.items()},
        "dispatch": _dispatch_counts(),
        "scored_dispatch": _scored_dispatch(),
        "opcheck": _opcheck(),
        "compiled": _compiled(),
    }
    print(json.dumps(report))


@pytest.fixture(scope="module")
def interpreted():
    from interpreted import run_interpreted  # (tests/unit; not imported by the child)

    return run_interpreted("tests.unit.test_topk_triton", PYRAMIDION_TOPK="")


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernels_equal_torch_path(interpreted, name):
    report = interpreted["cases"][name]
    assert report["mask"] and report["source_index"], f"{name}: pairing differs from the torch path: {report}"
    assert report["source_index_dtype"] == "torch.int64"
    # float32 against float32: 1e-6, or the torch path's own distance from float64 where that is larger (the
    # deep case mixes 32 members per slot); and Triton at least as close to float64 as that. The scores'
    # gradient carries ln(base)·base**s factors (~60 at base 20): 1e-5 relative to its largest entry
    for field in ("values", "scores", "grad_x", "grad_scores"):
        floor = 1e-5 * max(report[field + "_scale"], 1.0) if field == "grad_scores" else 1e-6
        torch_error = report[field + "_torch_error"]
        assert report[field] <= max(floor, torch_error), f"{name}: {field} differs by {report[field]:.3g}: {report}"
        assert report[field + "_triton_error"] <= max(floor, 1.5 * torch_error), f"{name}: {field}: {report}"
    spec = CASES[name]
    hard_or_identity = spec.get("hard") or spec["k"] >= spec["n"]
    expected = 0 if hard_or_identity else topk_triton_launches(spec["n"], spec["k"])
    assert report["launches"] == expected


@pytest.mark.parametrize("name", list(SCORED_CASES))
def test_fused_scorer_equals_torch_path(interpreted, name):
    """score_and_pool fused on the Triton path (the scorer's dot product, centring and sigmoid in the kernels)
    gives the torch operators' pairing exactly, and their values and gradients to float32 rounding."""
    report = interpreted["scored"][name]
    assert report["mask"] and report["source_index"], f"{name}: pairing differs from the torch path: {report}"
    assert report["source_index_dtype"] == "torch.int64"
    for field in ("values", "pooled_scores", "scores", "grad_x", "grad_weight", "grad_bias"):
        tolerance = 2e-5 * max(report[field + "_scale"], 1.0)
        assert report[field] <= tolerance, f"{name}: {field} differs by {report[field]:.3g}: {report}"
    spec = SCORED_CASES[name]
    assert report["launches"] == topk_triton_launches(spec["n"], spec["k"], scorer=True)


def test_fused_scorer_dispatch_budget(interpreted):
    counts = interpreted["scored_dispatch"]
    assert counts["kernels"] == 4, counts  # score, plan round + mix, plan reverse + dW, score backward + grad_x
    assert len(counts["ops"]) <= SCORED_DISPATCH_BUDGET, (
        f"one single-round score_pool forward+backward dispatched {len(counts['ops'])} torch operators, budget "
        f"{SCORED_DISPATCH_BUDGET}: {counts['ops']}"
    )


def test_triton_launch_budget(interpreted):
    counts = interpreted["dispatch"]
    assert counts["kernels"] == topk_triton_launches(16, 4), counts["kernels"]
    assert len(counts["ops"]) <= TRITON_DISPATCH_BUDGET, (
        f"one Triton top-k forward+backward dispatched {len(counts['ops'])} torch operators, budget "
        f"{TRITON_DISPATCH_BUDGET}: {counts['ops']}"
    )


def test_full_graph_compile_of_triton_path(interpreted):
    """dynamo traces through the custom ops (fake implementations, registered autograd) without a break."""
    assert max(interpreted["compiled"]) <= 1e-6, interpreted["compiled"]


def topk_triton_launches(n, k, scorer=False):
    from pyramidion_ds.model.topk import round_widths

    rounds = len(round_widths(n, k))
    if scorer:  # the scorer's two kernels; a single round mixes and takes dW inside its plan kernels
        return 4 if rounds == 1 else 3 * rounds + 4
    # forward: rounds, compose (a single round writes its outputs itself), mix; backward: mix, R - 1 sweeps, R
    return 3 * rounds + 2 - (rounds == 1)


def test_every_launch_fills_an_h100():
    """B=4, 8192 → 2048 (two rounds, with and without sort_back): every launch of forward + backward has at
    least 132 programs (an H100's SMs). Meta tensors: the launchers run, the launches are only recorded."""
    pytest.importorskip("triton")
    from pyramidion_ds.model import topk_triton

    for sort_back in (False, True):
        x = torch.empty(4, 8192, 512, device="meta", dtype=torch.bfloat16, requires_grad=True)
        scores = torch.empty(4, 8192, device="meta", requires_grad=True)
        mask = torch.empty(4, 8192, device="meta", dtype=torch.bool)
        with topk_triton.record_launches() as launches:
            values, pooled, _, _ = topk_triton.pool(x, scores, mask, 2048, 20.0, True, sort_back)
            torch.autograd.backward([values, pooled], [torch.empty_like(values), torch.empty_like(pooled)])
        assert len(launches) == topk_triton.launches_per_call(8192, 2048) == topk_triton_launches(8192, 2048)
        for fn, grid, _, _ in launches:
            programs = math.prod(grid)
            assert programs >= 132, f"{fn.__name__} launched {grid}: {programs} programs, fewer than 132"
        assert {fn.__name__ for fn, _, _, _ in launches} == {
            "_plan_round",
            "_plan_compose",
            "_mix_forward",
            "_mix_backward",
            "_plan_subtree",
            "_plan_reverse",
        }
        assert list(topk_triton.launch_grids)[-len(launches) :] == [(fn.__name__, grid) for fn, grid, _, _ in launches]


def test_every_fused_scorer_launch_fills_an_h100():
    """score_pool (the encoder's pooling) at B=4, d=512: one round (8192 → 4096) and two (8192 → 2048), with
    and without sort_back: every launch has at least 132 programs. Meta tensors: launches recorded, none run."""
    pytest.importorskip("triton")
    from pyramidion_ds.model import topk_triton

    for k in (4096, 2048):
        for sort_back in (False, True):
            with topk_triton.record_launches() as launches:
                x = torch.empty(4, 8192, 512, device="meta", dtype=torch.bfloat16, requires_grad=True)
                weight = torch.empty(1, 512, device="meta", dtype=torch.bfloat16, requires_grad=True)
                mask = torch.empty(4, 8192, device="meta", dtype=torch.bool)
                values, _, _ = topk_triton.score_pool(x, weight, None, mask, k, 20.0, True, sort_back, True)
                values.backward(torch.empty_like(values))
            assert len(launches) == topk_triton.launches_per_call(8192, k, scorer=True)
            for fn, grid, _, _ in launches:
                assert math.prod(grid) >= 132, f"{fn.__name__} launched {grid} at 8192 → {k}"
            names = {fn.__name__ for fn, _, _, _ in launches}
            assert {"_score_forward", "_score_backward"} <= names
            assert ("_mix_forward" in names) == (k == 2048)  # one round: mixed inside _plan_round


def test_unsupported_shape_runs_on_torch_path(monkeypatch):
    """A shape the kernels do not take (here 2**16 rows × 32,769 lanes: flat positions past int32) runs on the
    torch path even when the kernels are forced, instead of failing. Meta tensors: shapes only."""
    pytest.importorskip("triton")
    from pyramidion_ds.model import topk_triton
    from pyramidion_ds.model.topk import successive_halving_topk

    monkeypatch.setenv("PYRAMIDION_TOPK", "triton")
    batch, n, k = 2**16, 2**15 + 1, 2**14
    assert not topk_triton.supports(batch, n, k) and topk_triton.supports(4, 65536, 1)
    # the eager workspace holds index data as float32 integers: flat slots b·k + j must stay below 2**24
    assert not topk_triton.supports(1024, 65536, 16384) and topk_triton.supports(1023, 65536, 16384)
    x = torch.empty(batch, n, 1, device="meta", requires_grad=True)
    scores = torch.empty(batch, n, device="meta", requires_grad=True)
    before = topk_triton.launch_count
    with topk_triton.record_launches() as launches:
        out = successive_halving_topk(x, scores, k, sort_back=True)
        (out.values.sum() + out.scores.sum()).backward()
    assert not launches and topk_triton.launch_count == before
    assert out.values.shape == (batch, k, 1) and x.grad.shape == x.shape


@pytest.mark.parametrize("op", ["topk_plan", "topk_mix"])
def test_custom_ops_pass_opcheck(interpreted, op):
    failures = {test: value for test, value in interpreted["opcheck"][op].items() if value != "SUCCESS"}
    assert not failures, f"opcheck of pyramidion::{op}: {failures}"


def test_precompile_without_cuda_writes_a_note(tmp_path, capsys):
    """``pyramidion-bench topk --precompile`` on a machine without CUDA: exit 0, a JSON note, nothing compiled."""
    from pyramidion_ds.bench import topk as bench

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU run reports real compile times")
    output = tmp_path / "precompile.json"
    assert bench.main(["--precompile", "--device", "cuda", "--dtype", "bf16", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["benchmark"] == "topk_precompile" and report["rows"] == [] and "no CUDA device" in report["note"]
    assert capsys.readouterr().out == ""  # the JSON goes to --output only


if __name__ == "__main__":
    main()
