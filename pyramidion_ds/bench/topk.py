"""pyramidion-bench topk: successive-halving top-k, forward + backward, against a per-example reference.

The reference is written here the way the fairseq original runs: a Python loop over the batch, and in
each example one round at a time, gathering and mixing the representations every round. Both run on
the same inputs in the same process; the JSON reports milliseconds per forward+backward and the speedup.
On CUDA the Triton kernels (``ours_triton``) are timed beside the torch path (``ours``, and
``ours_compiled`` with --compile), with the operators dispatched and kernels launched per call; and the
encoder's pooling, the scorer with the top-k: ``scored_fused`` (one operator, ``score_pool``) beside
``scored_unfused`` (the scorer's torch operators, then the Triton top-k).

``--precompile`` only compiles: every Triton kernel the shapes launch (forward + backward, every option set),
once, timed per kernel and shape, so a GPU run can report compile time on its own and time warm kernels
afterwards (the compiled kernels stay in the process and in Triton's cache). Without a CUDA device it
compiles nothing and says so in the JSON (exit 0); ``tests/unit/test_topk_compile.py`` compiles the kernels
for sm_80 and sm_90 without a GPU. ``--output FILE`` writes the JSON there (rewritten whole after every
shape, so a run that fails half-way leaves the rows so far) instead of printing it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Callable

import torch

from pyramidion_ds.model import topk_triton
from pyramidion_ds.model.topk import BACKEND_ENV, pool_by_logits, score_and_pool, successive_halving_topk

from .output import write_json

#: (batch, n, k, d): the issue's two shapes
DEFAULT_SHAPES = ((8, 8192, 2048, 512), (8, 2048, 512, 256))
#: what --precompile compiles: those, and a single round (the halving schedule's poolings, whose score_pool
#: also mixes and takes dW in its plan kernels: other variants; 41 kernels in all for one architecture)
PRECOMPILE_SHAPES = DEFAULT_SHAPES + ((8, 8192, 4096, 512),)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def per_example_topk(
    x: torch.Tensor, scores: torch.Tensor, k: int, base: float = 20.0, flip_right: bool = True, sort_back: bool = False
):
    """The original's shape of computation: loop over examples, then over halving rounds (n/k a power of 2)."""
    pooled_x, pooled_scores = [], []
    for b in range(x.size(0)):
        embs, s = x[b : b + 1], scores[b : b + 1]
        while embs.size(1) > k:
            order = s.sort(descending=True).indices
            half = order.size(1) // 2
            left, right = order[:, :half], order[:, half:]
            if flip_right:
                right = right.flip(1)
            pairs = torch.cat([left, right], dim=0)  # 2×half
            weights = torch.softmax(torch.pow(base, s[:, pairs]), dim=1)  # 1×2×half
            s = (s[:, pairs] * weights).sum(1)
            embs = (embs[:, pairs] * weights.unsqueeze(3)).sum(1)
            if sort_back:
                back = pairs[0].sort().indices
                s, embs = s[:, back], embs[:, back]
        pooled_x.append(embs)
        pooled_scores.append(s)
    return torch.cat(pooled_x), torch.cat(pooled_scores)


@contextlib.contextmanager
def backend(name: str):
    """Force the top-k implementation (torch or triton) inside the block."""
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV)
        else:
            os.environ[BACKEND_ENV] = previous


def ours(x, scores, k, **kwargs):
    """The torch path."""
    with backend("torch"):
        out = successive_halving_topk(x, scores, k, **kwargs)
    return out.values, out.scores


def ours_triton(x, scores, k, **kwargs):
    """The Triton kernels."""
    with backend("triton"):
        out = successive_halving_topk(x, scores, k, **kwargs)
    return out.values, out.scores


def scored(fused: bool, mask: torch.Tensor) -> Callable:
    """The encoder's pooling of x by a scorer weight (1×d; centred, no bias) on the Triton path: fused into the
    kernels (score_pool), or the scorer's torch operators and then the Triton top-k. Returns (values, None)."""

    def fn(x, weight, k, **kwargs):
        with backend("triton"):
            if fused:
                out = score_and_pool(x, weight, None, mask, k, centre=True, **kwargs)
            else:
                logits = torch.nn.functional.linear(x, weight).squeeze(-1).float()
                out = pool_by_logits(x, logits, mask, k, True, **kwargs)
        return out.values, None

    return fn


def dispatch_counts(fn, x, scores, k, **kwargs) -> dict:
    """Torch operators dispatched (views included) and Triton kernels launched by one forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not topk_triton.launching:  # (in Triton's interpreter a kernel dispatches operators of its own)
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    x_in, s_in = x.detach().requires_grad_(True), scores.detach().requires_grad_(True)
    kernels = topk_triton.launch_count
    grad_values = torch.ones(x.size(0), k, x.size(2), dtype=x.dtype, device=x.device)
    grad_scores = torch.ones(x.size(0), k, device=x.device)
    with Count():
        values, pooled = fn(x_in, s_in, k, **kwargs)
        _backward(values, pooled, grad_values, grad_scores)
    return {"ops": Count.ops, "triton_kernels": topk_triton.launch_count - kernels}


def _backward(values, pooled, grad_values, grad_scores) -> None:
    """Backward from the values and, when there (the plain top-k's), the pooled scores."""
    if pooled is None:
        values.backward(grad_values)
    else:
        torch.autograd.backward([values, pooled], [grad_values, grad_scores])


_compiled = None


def ours_compiled(x, scores, k, **kwargs):
    """The same op under torch.compile (what an engine may apply from outside; removes launch overhead)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(successive_halving_topk, dynamic=False)
    with backend("torch"):
        out = _compiled(x, scores, k, **kwargs)
    return out.values, out.scores


def time_fwd_bwd(fn: Callable, x, scores, k, *, repeats: int, warmup: int, **kwargs) -> dict:
    """Median milliseconds of forward + backward (a random upstream gradient into values and scores)."""
    device = x.device
    grad_values = grad_scores = None
    samples = []
    for i in range(warmup + repeats):
        x_in = x.detach().requires_grad_(True)
        s_in = scores.detach().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        values, pooled = fn(x_in, s_in, k, **kwargs)
        if grad_values is None:
            grad_values = torch.randn_like(values)
            grad_scores = None if pooled is None else torch.randn_like(pooled)
        _backward(values, pooled, grad_values, grad_scores)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            samples.append(elapsed)
    return {"ms": round(statistics.median(samples), 4), "min_ms": round(min(samples), 4)}


def bench_shape(
    batch: int,
    n: int,
    k: int,
    d: int,
    *,
    device="cpu",
    dtype=torch.float32,
    repeats=5,
    warmup=2,
    reference=True,
    base=20.0,
    flip_right=True,
    sort_back=False,
    compiled=False,
) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, n, d, generator=generator).to(device=device, dtype=dtype)
    # the scorer's output: sigmoid + 1e-5, kept in float32 like the encoder's ranking
    scores = (torch.rand(batch, n, generator=generator) + 1e-5).to(device)
    options = dict(base=base, flip_right=flip_right, sort_back=sort_back)
    result = {
        "batch": batch,
        "n": n,
        "k": k,
        "d": d,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "ours": time_fwd_bwd(ours, x, scores, k, repeats=repeats, warmup=warmup, **options),
        "dispatch": {"torch": dispatch_counts(ours, x, scores, k, **options)},
    }
    if torch.device(device).type == "cuda" and topk_triton.AVAILABLE:
        result["ours_triton"] = time_fwd_bwd(ours_triton, x, scores, k, repeats=repeats, warmup=warmup, **options)
        result["dispatch"]["triton"] = dispatch_counts(ours_triton, x, scores, k, **options)
        result["triton_speedup_vs_torch"] = round(result["ours"]["ms"] / result["ours_triton"]["ms"], 2)
        weight = (torch.randn(1, d, generator=generator) * d**-0.5).to(device=device, dtype=dtype)
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
        for name, fused in (("scored_unfused", False), ("scored_fused", True)):
            fn = scored(fused, mask)
            result[name] = time_fwd_bwd(fn, x, weight, k, repeats=repeats, warmup=warmup, **options)
            result["dispatch"][name] = dispatch_counts(fn, x, weight, k, **options)
        result["fused_scorer_speedup"] = round(result["scored_unfused"]["ms"] / result["scored_fused"]["ms"], 2)
    if compiled:
        try:
            result["ours_compiled"] = time_fwd_bwd(
                ours_compiled, x, scores, k, repeats=repeats, warmup=warmup, **options
            )
        except Exception as err:  # report, do not fail the benchmark
            result["ours_compiled"] = {"error": repr(err)[:300]}
    if reference:
        result["per_example_reference"] = time_fwd_bwd(
            per_example_topk, x, scores, k, repeats=repeats, warmup=warmup, **options
        )
        result["speedup"] = round(result["per_example_reference"]["ms"] / result["ours"]["ms"], 2)
    return result


def precompile(shapes=PRECOMPILE_SHAPES, *, device="cuda", dtype="bf16", on_row: Callable | None = None) -> dict:
    """Compile every Triton kernel the shapes launch (both flip_right and sort_back settings), timing each
    compile; kernels already compiled for an earlier shape show ``"cached": true`` and 0 s."""
    report = {"benchmark": "topk_precompile", "device": str(device), "dtype": dtype, "rows": []}
    if torch.device(device).type != "cuda" or not torch.cuda.is_available() or not topk_triton.AVAILABLE:
        report["note"] = (
            "no CUDA device with triton: nothing compiled (tests/unit/test_topk_compile.py compiles the kernels "
            "for sm_80 and sm_90 without a GPU)"
        )
        return report
    import triton

    report["triton"], report["gpu"] = triton.__version__, torch.cuda.get_device_name()
    seen, start = set(), time.perf_counter()
    for batch, n, k, d in shapes:
        for flip_right in (True, False):
            for sort_back in (False, True):
                # the plain top-k's and score_pool's (the encoder's) launches, recorded on meta tensors, none run
                launches = topk_triton.planned_launches(batch, n, k, d, DTYPES[dtype], flip_right, sort_back)
                for fn, grid, args, meta in launches:
                    # a tensor argument as its dtype: triton's warmup compiles for aligned pointers of that type
                    args = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
                    kernel = topk_triton._kernel(fn)
                    t0 = time.perf_counter()
                    compiled = kernel.warmup(*args, grid=grid, **meta)
                    seconds = time.perf_counter() - t0
                    key = (fn.__name__, compiled.hash)
                    row = {
                        "kernel": fn.__name__,
                        "batch": batch,
                        "n": n,
                        "k": k,
                        "d": d,
                        "flip_right": flip_right,
                        "sort_back": sort_back,
                        "compile_s": 0.0 if key in seen else round(seconds, 3),
                        "cached": key in seen,
                    }
                    seen.add(key)
                    report["rows"].append(row)
        if on_row is not None:
            on_row(report)
    report["kernels_compiled"] = len(seen)
    report["total_compile_s"] = round(time.perf_counter() - start, 3)
    return report


def emit(report: dict, path: str | None) -> None:
    """The report to ``path`` (atomically, see :mod:`.output`), or to stdout without one."""
    if path is None:
        print(json.dumps(report, indent=2))
    else:
        write_json(path, report)


def run(
    shapes=DEFAULT_SHAPES,
    *,
    device="cpu",
    dtype="fp32",
    repeats=5,
    warmup=2,
    reference=True,
    sort_back=False,
    compiled=False,
    on_row: Callable | None = None,
) -> dict:
    report = {"benchmark": "topk", "torch": torch.__version__, "threads": torch.get_num_threads(), "results": []}
    for shape in shapes:
        report["results"].append(
            bench_shape(
                *shape,
                device=device,
                dtype=DTYPES[dtype],
                repeats=repeats,
                warmup=warmup,
                reference=reference,
                sort_back=sort_back,
                compiled=compiled,
            )
        )
        if on_row is not None:
            on_row(report)
    return report


def profile_op(batch: int, n: int, k: int, d: int, *, device="cuda", dtype=torch.bfloat16, iterations=10) -> dict:
    """Where the time goes: profiler table of fwd+bwd, and on CUDA the GPU-only time by CUDA-graph replay
    (the gap to the event-timed figure is host launch overhead)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, n, d, device=device, dtype=dtype)
    scores = torch.rand(batch, n, device=device)
    probe = successive_halving_topk(x, scores, k)
    grads = [torch.randn_like(probe.values), torch.randn_like(probe.scores)]

    def step():
        out = successive_halving_topk(x.detach().requires_grad_(True), scores.detach().requires_grad_(True), k)
        torch.autograd.backward([out.values, out.scores], grads)

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(3):
        step()
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            step()
        if cuda:
            torch.cuda.synchronize()
    sort_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    report = {"table": prof.key_averages().table(sort_by=sort_key, row_limit=25)}
    if cuda:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(5):
                graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            report["cuda_graph_ms"] = round(start.elapsed_time(end) / 50, 4)
        except Exception as err:  # report, do not fail the benchmark
            report["cuda_graph_error"] = repr(err)[:300]
    return report


def parse_shape(text: str) -> tuple:
    try:
        batch, n, k, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: got {text!r}, expected BxNxKxD such as 8x8192x2048x512") from None
    return batch, n, k, d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyramidion-bench topk", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="representation dtype")
    parser.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        help="BxNxKxD, repeatable (default: 8x8192x2048x512 and 8x2048x512x256)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--sort-back", action="store_true", help="benchmark with sort_back")
    parser.add_argument("--no-reference", action="store_true", help="skip the per-example reference")
    parser.add_argument("--compile", action="store_true", help="also time the op under torch.compile")
    parser.add_argument(
        "--precompile",
        action="store_true",
        help="only compile every Triton kernel the shapes launch and report seconds per kernel and shape",
    )
    parser.add_argument("--output", help="write the JSON to this file (after every shape) instead of stdout")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a profiler table (and CUDA-graph GPU-only time) for the first shape instead",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "torch", "triton"),
        help="top-k implementation profiled by --profile (auto: Triton on CUDA)",
    )
    args = parser.parse_args(argv)
    if args.profile:
        with backend(args.backend):
            report = profile_op(*(args.shape or DEFAULT_SHAPES)[0], device=args.device, dtype=DTYPES[args.dtype])
        print(report.pop("table"))
        print(json.dumps(report, indent=2))
        return 0
    if args.output is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        parser.error(f"--output: no folder {os.path.dirname(os.path.abspath(args.output))!r} to write into")
    shapes = tuple(args.shape or DEFAULT_SHAPES)
    progress = None if args.output is None else (lambda partial: emit(partial, args.output))
    if args.precompile:
        shapes = tuple(args.shape or PRECOMPILE_SHAPES)
        emit(precompile(shapes, device=args.device, dtype=args.dtype, on_row=progress), args.output)
        return 0
    report = run(
        shapes,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        reference=not args.no_reference,
        sort_back=args.sort_back,
        compiled=args.compile,
        on_row=progress,
    )
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
