"""pyramidion-bench generate: beam search exactness, and seconds vs no-KV-cache and HF BART, same run.

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

    pyramidion-bench generate                              # the default workload on CPU
    pyramidion-bench generate --src-len 256 --new-tokens 8 --skip-nocache   # a quick look
    pyramidion-bench generate --device cuda --dtype bf16   # the H100 target
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from pyramidion_ds.config.core import build
from pyramidion_ds.config.model import ModelConfig
from pyramidion_ds.generate.search import SearchOptions, exhaustive_search, generate
from pyramidion_ds.model import PyramidionModel


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
    cfg = build(
        ModelConfig,
        dict(
            preset=args.preset,
            vocab_size=args.vocab,
            dropout=0.0,
            max_source_positions=max(args.src_len, 64),
            hard_topk=args.hard_topk,
        ),
    )
    torch.manual_seed(0)
    model = PyramidionModel(cfg).to(device=device, dtype=dtype).eval()
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


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="pyramidion-bench generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="base", choices=("debug", "base", "large"))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--beam", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--src-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--hard-topk", action="store_true", help="exact top-k in the encoder (inference option)")
    p.add_argument("--skip-exactness", action="store_true")
    p.add_argument("--skip-nocache", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    return p.parse_args(argv)


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
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    print(json.dumps(report, indent=1))
    return 0 if report.get("exactness", {}).get("beam_equals_exhaustive", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
