"""pyramidion-bench generate: beam search exactness; seconds vs no-KV-cache and HF BART, or vs blockwise
and vanilla encoders of the same size (``--variants``), same run.

1. exactness: on a tiny model (7-token vocabulary, 3 tokens + </s>) beam search with a beam as wide as
   the number of sequences must return exactly the exhaustive search's n-best, for several length
   penalties / min lengths / n-gram blocking settings.
2. timing (random weights, ``--preset`` dims, vocabulary ``--vocab``): encode + beam search of
   ``--batch`` sources of ``--src-len`` tokens, beam ``--beam``, exactly ``--new-tokens`` tokens
   (min_len = max_len), with the KV cache, without it (the whole prefix decoded every step), and HF
   ``transformers`` BART of the same dims (``generate`` with the same beam settings; skipped with a
   note when transformers is missing). Medians of ``--repeats`` runs after one warm-up; peak memory.
   On CUDA the first row is the default decoding (static KV cache, each step replayed from a CUDA graph)
   and ``kv_cache`` is the eager growing cache; ``slowdown`` is relative to the first row.
3. ``--variants pyramidion,blockwise,vanilla``: the paper's headline (summarizing 8k-token documents
   faster than blockwise attention). One model per variant with the same dims, vocabulary and weights
   (one seed; the variants share every parameter), the same random sources; per source length
   (``--src-lens``) the repeats go round the variants in turn. Each row: encode and decode seconds
   (medians), documents/s, speed-ups over blockwise and vanilla (total and decode only), peak memory,
   the cross-attention cache (one K/V row per source over the encoder's output width) and the
   self-attention cache in bytes. Every hypothesis is exactly ``--new-tokens`` long, so every variant
   does the same work (``--free-length``: they may end after ``--min-len``). ``--workload authors``
   (default): batch 8, beam 16, 8,192 / 16,384 / 32,768-token sources, 128 new tokens (the authors'
   ``--min-len 72`` is met); ``--workload cpu``: batch 2, beam 4, 8,192 tokens, 64 new tokens.
   ``--memory-gib G`` adds each variant's largest batch within G and its documents/s there. On CUDA the
   steps replay from CUDA graphs, as shipped. ``--output`` is rewritten after every measurement.

    pyramidion-bench generate                              # the default workload on CPU
    pyramidion-bench generate --src-len 256 --new-tokens 8 --skip-nocache   # a quick look
    pyramidion-bench generate --device cuda --dtype bf16   # the H100 target

    pyramidion-bench generate --variants pyramidion,blockwise,vanilla --device cuda --dtype bf16 --output g.json
    pyramidion-bench generate --variants pyramidion,blockwise,vanilla --workload cpu --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import time

import torch

from pyramidion_ds.config.core import build
from pyramidion_ds.config.model import ModelConfig
from pyramidion_ds.generate.search import SearchOptions, exhaustive_search, generate
from pyramidion_ds.model import PyramidionModel

from .output import write_json


def tiny_model(seed: int = 0) -> PyramidionModel:
    torch.manual_seed(seed)
    cfg = build(
        ModelConfig,
        dict(
            vocab_size=7,
            d_model=16,
            num_heads=2,
            ffn_dim=32,
            encoder_layers=2,
            decoder_layers=2,
            max_source_positions=32,
            max_target_positions=16,
            chunk_size=8,
            dropout=0.0,
        ),
    )
    model = PyramidionModel(cfg).eval()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(4.0)  # peakier distributions: rankings that matter
    return model


def tiny_sources(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 9, 5])
    src = torch.randint(4, 7, (3, 12), generator=gen)
    for row, n in enumerate(lengths.tolist()):
        src[row, n - 1] = 2
        src[row, n:] = 1
    return src, lengths


EXACTNESS_SETTINGS = [
    dict(lenpen=1.0, min_len=0),
    dict(lenpen=0.5, min_len=1),
    dict(lenpen=2.0, min_len=1),
    dict(lenpen=1.0, min_len=1, no_repeat_ngram_size=2),
]


def check_exactness(seeds=(0, 1)) -> dict:
    """Beam search (beam = every sequence) vs exhaustive search on tiny models: same n-best."""
    cases, mismatches, max_score_diff = 0, [], 0.0
    for seed in seeds:
        model = tiny_model(seed)
        src, lengths = tiny_sources(seed)
        for setting in EXACTNESS_SETTINGS:
            opts = SearchOptions(beam=85, nbest=5, max_len_a=0.0, max_len_b=3, **setting)
            beam = generate(model, src, lengths, opts)
            exact = exhaustive_search(model, src, lengths, opts)
            for b, (x, y) in enumerate(zip(beam, exact, strict=True)):
                cases += 1
                if [h.tokens for h in x] != [h.tokens for h in y]:
                    mismatches.append({"seed": seed, "source": b, **setting})
                max_score_diff = max([max_score_diff] + [abs(h.score - g.score) for h, g in zip(x, y, strict=False)])
    return {
        "cases": cases,
        "beam_equals_exhaustive": not mismatches,
        "mismatches": mismatches,
        "max_score_diff": max_score_diff,
    }


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int) -> tuple[float, object]:
    samples, out = [], None
    for i in range(repeats + 1):  # the first run warms up
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        if i:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples), out


def bench_ours(args, device, dtype, src, lengths, use_cache: bool, cuda_graph: bool = False) -> dict:
    model = variant_model(args, "pyramidion", max(args.src_len, 64), device, dtype)
    cfg = model.cfg
    opts = SearchOptions(
        beam=args.beam,
        nbest=1,
        min_len=args.new_tokens,
        max_len_b=args.new_tokens,
        use_cache=use_cache,
        cuda_graph=cuda_graph,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, hyps = _time(lambda: generate(model, src, lengths, opts), device, args.repeats)
    encode_seconds, _ = _time(lambda: model.encode(src, lengths), device, args.repeats)
    out = {
        "seconds": round(seconds, 4),
        "encode_seconds": round(encode_seconds, 4),
        "new_tokens": len(hyps[0][0].tokens) - 1,
        "encoder_widths": cfg.encoder_widths(),
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def bench_hf_bart(args, device, dtype, src) -> dict:
    try:
        from transformers import BartConfig, BartForConditionalGeneration
    except Exception as err:  # not installed, or a broken install
        return {
            "skipped": f"transformers unavailable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            f"pip install -e .[bench]"
        }
    d = {"base": (512, 8, 2048, 6, 6), "debug": (64, 4, 128, 3, 2), "large": (1024, 16, 4096, 12, 12)}[args.preset]
    config = BartConfig(
        vocab_size=args.vocab,
        d_model=d[0],
        encoder_attention_heads=d[1],
        decoder_attention_heads=d[1],
        encoder_ffn_dim=d[2],
        decoder_ffn_dim=d[2],
        encoder_layers=d[3],
        decoder_layers=d[4],
        max_position_embeddings=max(args.src_len, args.new_tokens + 2),
        dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    mask = src.ne(1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run():
        with torch.no_grad():
            return model.generate(
                input_ids=src,
                attention_mask=mask,
                num_beams=args.beam,
                num_return_sequences=1,
                min_new_tokens=args.new_tokens,
                max_new_tokens=args.new_tokens,
                length_penalty=1.0,
                early_stopping=False,
                do_sample=False,
                no_repeat_ngram_size=0,
            )

    seconds, out = _time(run, device, args.repeats)
    result = {"seconds": round(seconds, 4), "new_tokens": int(out.size(1)) - 1, "attention": "full (sdpa)"}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


def cached_vs_baselines(args, device, dtype, report: dict) -> None:
    """The default rows: ours with the KV cache (on CUDA also CUDA-graph steps), without it, HF BART."""
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(4, args.vocab, (args.batch, args.src_len), generator=gen)
    src[:, -1] = 2
    src, lengths = src.to(device), torch.full((args.batch,), args.src_len, device=device)
    with torch.no_grad():
        ours = "kv_cache"
        if device.type == "cuda":  # the default on CUDA: static cache, steps replayed from a CUDA graph
            ours = "cuda_graph"
            report["cuda_graph"] = bench_ours(args, device, dtype, src, lengths, use_cache=True, cuda_graph=True)
        report["kv_cache"] = bench_ours(args, device, dtype, src, lengths, use_cache=True)
        if not args.skip_nocache:
            report["no_kv_cache"] = bench_ours(args, device, dtype, src, lengths, use_cache=False)
        if not args.skip_hf:
            report["hf_bart"] = bench_hf_bart(args, device, dtype, src)
        for name in ("kv_cache", "no_kv_cache", "hf_bart"):
            if name != ours and "seconds" in report.get(name, {}):
                report[name]["slowdown"] = round(report[name]["seconds"] / report[ours]["seconds"], 2)


# ------------------------------------------------------------------------------------------------------
# --variants: pyramidion vs blockwise vs vanilla, same dims, vocabulary and weights (the paper's headline)
# ------------------------------------------------------------------------------------------------------

#: --workload: the authors' inference settings, and a size a 2-core CPU finishes in minutes
WORKLOADS = {
    "authors": dict(batch=8, beam=16, src_lens=[8192, 16384, 32768], new_tokens=128),
    "cpu": dict(batch=2, beam=4, src_lens=[8192], new_tokens=64),
}
COMPARED_VARIANTS = ("pyramidion", "blockwise", "vanilla", "transpooler")
#: --min-len: the authors' (fairseq) minimum summary length
AUTHORS_MIN_LEN = 72


def variant_model(args, variant: str, src_len: int, device, dtype) -> PyramidionModel:
    """``--preset`` dims for ``variant``; the seed is fixed and every variant has the same parameters
    (pooling only changes widths), so the three models hold identical weights."""
    cfg = build(
        ModelConfig,
        dict(
            preset=args.preset,
            variant=variant,
            vocab_size=args.vocab,
            dropout=0.0,
            max_source_positions=src_len,
            max_target_positions=max(args.new_tokens + 2, 64),
            hard_topk=args.hard_topk,
        ),
    )
    torch.manual_seed(0)
    return PyramidionModel(cfg).to(device=device, dtype=dtype).eval()


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of |parameter| over the model: equal across variants when their weights are."""
    return round(sum(float(p.detach().float().abs().sum()) for p in model.parameters()), 3)


class PeakMemory:
    """Peak memory of a block, as the model's parameter bytes plus what the block added at its peak.
    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before the block (other models on the device
    do not count). CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after
    ``malloc_trim``) minus its resident set before the block; where the kernel lacks the reset, the
    lifetime peak (ru_maxrss), which overstates a later, smaller run."""

    def __init__(self, device, weight_bytes: int):
        self.device, self.weight_bytes, self.bytes = device, weight_bytes, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        self.before = _proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            added = torch.cuda.max_memory_allocated() - self.before
        else:
            peak = _proc_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            added = (peak - self.before) * 1024
        self.bytes = max(0, added) + self.weight_bytes
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def comparison_sources(batch: int, src_len: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(src_len)
    src = torch.randint(4, vocab, (batch, src_len), generator=gen)
    src[:, -1] = 2
    return src.to(device), torch.full((batch,), src_len, device=device)


def search_options(args, device) -> SearchOptions:
    """Every hypothesis exactly ``--new-tokens`` long (min_len = max_len), so every variant does the same
    work; ``--free-length`` lets hypotheses end after ``--min-len`` instead."""
    return SearchOptions(
        beam=args.beam,
        nbest=1,
        min_len=args.min_len if args.free_length else args.new_tokens,
        max_len_b=args.new_tokens,
        cuda_graph=device.type == "cuda",  # as shipped: static cache, steps replayed from a CUDA graph
    )


def run_once(model, src, lengths, opts, device) -> dict:
    """Encode, then beam search over that encoding: seconds of each, the pooled width, tokens generated."""
    _sync(device)
    start = time.perf_counter()
    encoder_out = model.encode(src, lengths)
    _sync(device)
    encoded = time.perf_counter()
    hyps = generate(model, src, lengths, opts, encoder_out=encoder_out)
    _sync(device)
    return {
        "encode_seconds": encoded - start,
        "decode_seconds": time.perf_counter() - encoded,
        "encoder_width": encoder_out.hidden.size(1),
        "new_tokens": max(len(h[0].tokens) for h in hyps) - 1,
    }


def cache_bytes(cfg: ModelConfig, batch: int, beam: int, width: int, new_tokens: int, element_bytes: int) -> dict:
    """Decoder cache sizes: cross-attention K/V (one row per source, shared by its beams) over ``width``
    encoder outputs, and self-attention K/V of every hypothesis at the last step."""
    per_position = 2 * cfg.decoder_layers * cfg.d_model * element_bytes
    return {
        "cross_attention_cache_bytes": batch * width * per_position,
        "self_attention_cache_bytes": batch * beam * (new_tokens + 1) * per_position,
    }


def add_comparison_speedups(rows: list[dict]) -> None:
    """speedup_vs_blockwise / _vanilla: total seconds of that variant's row at the same length over this row's."""
    for row in rows:
        for base in ("blockwise", "vanilla"):
            if row["variant"] == base:
                continue
            ref = next((r for r in rows if r["variant"] == base and r["src_len"] == row["src_len"]), None)
            if ref is not None and "seconds" in ref and "seconds" in row:
                row[f"speedup_vs_{base}"] = round(ref["seconds"] / row["seconds"], 3)
                row[f"decode_speedup_vs_{base}"] = round(ref["decode_seconds"] / row["decode_seconds"], 3)
            mine, theirs = row.get("largest_batch", {}), (ref or {}).get("largest_batch", {})
            if "docs_per_s" in mine and "docs_per_s" in theirs:
                mine[f"speedup_vs_{base}"] = round(mine["docs_per_s"] / theirs["docs_per_s"], 3)


def compare_variants(args, device, dtype, report, write) -> None:
    """Rows per (source length, variant), repeats interleaved over the variants; ``write(report)`` after
    every measurement, so a run cut short keeps what it measured."""
    element_bytes = torch.finfo(dtype).bits // 8
    opts = search_options(args, device)
    report["comparison"] = rows = []
    for src_len in args.src_lens:
        src, lengths = comparison_sources(args.batch, src_len, args.vocab, device)
        models = {variant: variant_model(args, variant, src_len, device, dtype) for variant in args.variants}
        length_rows = {}
        for variant, model in models.items():
            row = dict(variant=variant, src_len=src_len, batch=args.batch, beam=args.beam)
            row["weights_checksum"] = weights_checksum(model)
            length_rows[variant] = row
            rows.append(row)
        samples = {variant: [] for variant in models}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for variant, model in models.items():
                row = length_rows[variant]
                if "error" in row:  # out of memory once: the later rounds would be too
                    continue
                weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                try:
                    with torch.no_grad(), PeakMemory(device, weight_bytes) as peak:
                        sample = run_once(model, src, lengths, opts, device)
                except torch.cuda.OutOfMemoryError as err:
                    row["error"] = f"OutOfMemoryError: {str(err).splitlines()[0][:200]}"
                    torch.cuda.empty_cache()
                    write(report)
                    continue
                row["peak_memory_gib"] = round(max(row.get("peak_memory_gib", 0.0), peak.bytes / 2**30), 3)
                row["encoder_width"], row["new_tokens"] = sample["encoder_width"], sample["new_tokens"]
                row.update(
                    cache_bytes(
                        model.cfg, args.batch, args.beam, sample["encoder_width"], args.new_tokens, element_bytes
                    )
                )
                if repeat == 0 and args.repeats > 0:
                    write(report)  # the warm-up's peak memory and cache sizes
                    continue
                samples[variant].append(sample)
                encode = statistics.median(s["encode_seconds"] for s in samples[variant])
                decode = statistics.median(s["decode_seconds"] for s in samples[variant])
                row.update(
                    encode_seconds=round(encode, 4),
                    decode_seconds=round(decode, 4),
                    seconds=round(encode + decode, 4),
                    docs_per_s=round(args.batch / (encode + decode), 4),
                    repeats=len(samples[variant]),
                )
                add_comparison_speedups(rows)
                write(report)
        if args.memory_gib:
            for variant, model in models.items():
                length_rows[variant]["largest_batch"] = largest_batch(args, model, src_len, opts, device)
                add_comparison_speedups(rows)
                write(report)
        models = None
        _release(device)


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(args, model, src_len: int, opts: SearchOptions, device) -> dict:
    """The largest batch whose peak memory (see :class:`PeakMemory`) stays within ``--memory-gib``, and
    documents/s there: peaks at batch 1 and 2 give memory per document; the batch they predict is run,
    and stepped down in proportion while it overshoots (or runs out of memory)."""
    budget = args.memory_gib * 2**30
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tried = []

    def measure(batch: int) -> dict:
        src, lengths = comparison_sources(batch, src_len, args.vocab, device)
        try:
            with torch.no_grad(), PeakMemory(device, weight_bytes) as peak:
                sample = run_once(model, src, lengths, opts, device)
        except (torch.cuda.OutOfMemoryError, MemoryError) as err:
            _release(device)
            tried.append({"batch": batch, "error": type(err).__name__})
            return tried[-1]
        seconds = sample["encode_seconds"] + sample["decode_seconds"]
        tried.append({"batch": batch, "peak_memory_gib": round(peak.bytes / 2**30, 3), "seconds": round(seconds, 4)})
        return {**tried[-1], "peak_bytes": peak.bytes}

    def within(got: dict) -> bool:
        return "error" not in got and got["peak_bytes"] <= budget

    one = fits = measure(1)
    if not within(one):
        return {"memory_gib": args.memory_gib, "batch": 0, "tried": tried}
    two = measure(2) if args.max_batch >= 2 else {"error": "capped"}
    if within(two):
        fits, per_doc = two, max(two["peak_bytes"] - one["peak_bytes"], 1)
        batch = min(args.max_batch, int((budget - (one["peak_bytes"] - per_doc)) // per_doc))
        for _ in range(4):  # the predicted batch, stepped down in proportion while it overshoots
            if batch <= fits["batch"]:
                break
            got = measure(batch)
            if within(got):
                fits = got
                break
            over = got.get("peak_bytes", 2 * budget) / budget
            batch = min(batch - 1, int(batch / over * 0.97))
    batch = fits["batch"]
    timed = measure(batch)  # the first run at a batch warms up (CUDA: graph capture)
    if "error" in timed:
        timed = fits
    return {
        "memory_gib": args.memory_gib,
        "batch": batch,
        "peak_memory_gib": timed["peak_memory_gib"],
        "seconds": timed["seconds"],
        "docs_per_s": round(batch / timed["seconds"], 4),
        "capped": batch == args.max_batch,
        "tried": tried,
    }


def profile_decode(args, device, dtype) -> dict:
    """Where a decoding step's time goes (CPU: perf_counter around module forwards, which run
    synchronously): the first variant at the first length, summed over the steps of one beam search."""
    model = variant_model(args, args.variants[0], args.src_lens[0], device, dtype)
    src, lengths = comparison_sources(args.batch, args.src_lens[0], args.vocab, device)
    opts = search_options(args, device)
    opts.cuda_graph = False  # module hooks do not run inside a replayed graph
    parts: dict[str, float] = {}

    def timed(name: str, obj, method: str = "forward", when=None) -> None:
        """Replace ``obj.method`` on this instance by a wrapper adding its seconds to ``parts[name]``."""
        inner = getattr(obj, method)

        def wrapper(*a, **kw):
            if when is not None and not when(*a, **kw):
                return inner(*a, **kw)
            _sync(device)
            start = time.perf_counter()
            out = inner(*a, **kw)
            _sync(device)
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - start
            return out

        setattr(obj, method, wrapper)

    for layer in model.decoder.layers:
        timed("self_attention", layer.self_attn, "causal")
        timed("cross_attention", layer.encoder_attn, "cross")
        timed("ffn", layer.ffn)
        for norm in (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm):
            timed("layer_norms", norm)
    timed("output_projection", model.embed_tokens, when=lambda x, project=False: project)
    timed("decoder_step", model.decoder)
    timed("decode_step", model, "decode_step")

    with torch.no_grad():
        encoder_out = model.encode(src, lengths)
        generate(model, src, lengths, opts, encoder_out=encoder_out)  # warm-up
        parts.clear()
        start = time.perf_counter()
        hyps = generate(model, src, lengths, opts, encoder_out=encoder_out)
        total = time.perf_counter() - start
    steps = len(hyps[0][0].tokens)
    inside_layers = sum(parts.get(k, 0.0) for k in ("self_attention", "cross_attention", "ffn", "layer_norms"))
    ms = {
        "self_attention": parts.get("self_attention", 0.0),
        "cross_attention": parts.get("cross_attention", 0.0),
        "ffn": parts.get("ffn", 0.0),
        "layer_norms": parts.get("layer_norms", 0.0),
        "decoder_other": parts.get("decoder_step", 0.0) - inside_layers,  # positions, residual adds
        "output_projection": parts.get("output_projection", 0.0),
        "decode_step_other": parts.get("decode_step", 0.0)
        - parts.get("decoder_step", 0.0)
        - parts.get("output_projection", 0.0),  # embedding lookup, slicing
        "beam_bookkeeping": total - parts.get("decode_step", 0.0),  # log-softmax, top-k, reorders, finalizing
    }
    return {
        "variant": args.variants[0],
        "src_len": args.src_lens[0],
        "rows": args.batch * args.beam,
        "steps": steps,
        "step_ms": round(1000 * total / steps, 3),
        "ms_per_step": {k: round(1000 * v / steps, 3) for k, v in ms.items()},
        "share": {k: round(v / total, 3) for k, v in ms.items()},
    }


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _variant_list(text: str) -> list[str]:
    variants = _comma_list(text)
    unknown = [v for v in variants if v not in COMPARED_VARIANTS]
    if unknown or not variants:
        raise argparse.ArgumentTypeError(
            f"got {text!r}, expected a comma-separated list of {', '.join(COMPARED_VARIANTS)}"
        )
    return variants


def _length_list(text: str) -> list[int]:
    try:
        lengths = [int(item) for item in _comma_list(text)]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected comma-separated source lengths, e.g. 8192,16384")
    return lengths


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="pyramidion-bench generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="base", choices=("debug", "base", "large"), help="model dims")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--variants",
        type=_variant_list,
        default=None,
        help="compare these encoder variants, e.g. pyramidion,blockwise,vanilla (instead of the no-cache and HF rows)",
    )
    p.add_argument(
        "--workload",
        default="authors",
        choices=tuple(WORKLOADS),
        help="with --variants: the sizes below not given (authors: batch 8, beam 16, 8k/16k/32k "
        "sources, 128 new tokens; cpu: batch 2, beam 4, 8k sources, 64 new tokens)",
    )
    p.add_argument("--batch", type=int, default=None, help="sources per batch (default 4; --variants: the workload's)")
    p.add_argument("--beam", type=int, default=None, help="beam size (default 8; --variants: the workload's)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per hypothesis (default 64)")
    p.add_argument("--src-len", type=int, default=None, help="source length (default 2048)")
    p.add_argument("--src-lens", type=_length_list, default=None, help="--variants: source lengths, e.g. 8192,16384")
    p.add_argument(
        "--min-len",
        type=int,
        default=AUTHORS_MIN_LEN,
        help="--variants with --free-length: the shortest hypothesis (the authors' 72)",
    )
    p.add_argument(
        "--free-length",
        action="store_true",
        help="--variants: hypotheses may end after --min-len "
        "(then variants may do different work); default: every one is --new-tokens long",
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        default=0.0,
        help="--variants: also find each variant's largest "
        "batch within this peak memory (weights + what the run adds: CUDA max_memory_allocated, CPU peak RSS)",
    )
    p.add_argument("--max-batch", type=int, default=4096, help="--memory-gib: never try a larger batch")
    p.add_argument(
        "--profile-decode",
        action="store_true",
        help="--variants: where the first variant's "
        "decoding steps spend their time (self-/cross-attention, FFN, output projection, beam bookkeeping)",
    )
    p.add_argument("--output", default=None, help="also write the JSON here (rewritten after every measurement)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--hard-topk", action="store_true", help="exact top-k in the encoder (inference option)")
    p.add_argument("--skip-exactness", action="store_true")
    p.add_argument("--skip-nocache", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args(argv)
    defaults = dict(batch=4, beam=8, new_tokens=64, src_lens=[2048])
    if args.variants:
        defaults = WORKLOADS[args.workload]
    else:
        given = [
            flag
            for flag, on in (
                ("--src-lens", args.src_lens),
                ("--memory-gib", args.memory_gib),
                ("--profile-decode", args.profile_decode),
                ("--free-length", args.free_length),
            )
            if on
        ]
        if given:
            p.error(f"{given[0]}: only with --variants")
    if args.src_len and not args.src_lens:
        args.src_lens = [args.src_len]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.src_len = args.src_lens[0]
    return args


def main(argv=None) -> int:
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    report = {
        "workload": {
            "preset": args.preset,
            "vocab": args.vocab,
            "batch": args.batch,
            "beam": args.beam,
            "new_tokens": args.new_tokens,
            "src_len": args.src_len,
            "device": str(device),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        }
    }
    if not args.skip_exactness:
        report["exactness"] = check_exactness()

    def write(result: dict) -> None:
        if args.output:
            write_json(args.output, result)

    if args.variants:
        report["workload"].update(
            variants=args.variants,
            workload=args.workload,
            src_lens=args.src_lens,
            min_len=args.min_len if args.free_length else args.new_tokens,
            memory="weights + (cuda: max_memory_allocated - allocated before)"
            if device.type == "cuda"
            else "weights + (peak RSS - RSS before)",
        )
        write(report)
        if args.profile_decode:
            report["decode_profile"] = profile_decode(args, device, dtype)
            write(report)
        compare_variants(args, device, dtype, report, write)
    else:
        cached_vs_baselines(args, device, dtype, report)
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    write(report)
    print(json.dumps(report, indent=1))
    return 0 if report.get("exactness", {}).get("beam_equals_exhaustive", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
