"""pyramidion-bench encoder: encoder forward + backward tokens/s for the four variants, same run, same machine.

Pyramidion runs with its widths halving after every layer (n/2, n/4, ...) and, as a second entry, with the
config's default schedule; the report gives each variant's tokens/s and the pyramidion/blockwise ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pyramidion_ds.config.model import MODEL_PRESETS, ModelConfig
from pyramidion_ds.model.encoder import Encoder

DEFAULT_LENGTHS = (2048, 8192, 16384)
VARIANTS = ("vanilla", "blockwise", "transpooler", "pyramidion", "pyramidion_default_schedule")


def halving_schedule(num_layers: int, length: int) -> list[int]:
    return [max(1, length >> (i + 1)) for i in range(num_layers)]


def make_encoder(variant: str, preset: str, length: int, device, dtype) -> Encoder:
    layers = MODEL_PRESETS[preset]["encoder_layers"]
    schedule = halving_schedule(layers, length) if variant == "pyramidion" else None
    cfg = ModelConfig(
        preset=preset,
        variant=variant.replace("_default_schedule", ""),
        vocab_size=32000,
        max_source_positions=length,
        pooling_schedule=schedule,
        dropout=0.0,
    )
    cfg.validate()
    return Encoder(cfg).to(device=device, dtype=dtype).train()


def time_encoder(encoder: Encoder, batch_size: int, length: int, *, repeats: int, warmup: int) -> dict:
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    d = encoder.cfg.d_model
    embedded = torch.randn(batch_size, length, d, device=device, dtype=dtype)
    real_mask = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    samples = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = encoder(embedded.requires_grad_(True), real_mask)
        out.hidden.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
        encoder.zero_grad(set_to_none=True)
        embedded = embedded.detach()
    seconds = statistics.median(samples)
    return {
        "ms": round(seconds * 1e3, 2),
        "tokens_per_s": round(batch_size * length / seconds, 1),
        "widths": encoder.widths,
        "output_width": out.hidden.size(1),
    }


def run(
    lengths=DEFAULT_LENGTHS,
    *,
    preset="base",
    variants=VARIANTS,
    batch_size=1,
    device="cpu",
    dtype="fp32",
    repeats=2,
    warmup=1,
    compile=False,
) -> dict:
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    results = []
    for length in lengths:
        row = {"length": length, "batch_size": batch_size}
        for variant in variants:
            torch.manual_seed(0)
            encoder = make_encoder(variant, preset, length, device, torch_dtype)
            if compile:  # fuses the top-k's score-side rounds and the layers' elementwise chains
                compiled = torch.compile(encoder)
                compiled.cfg, compiled.widths = encoder.cfg, encoder.widths
                encoder = compiled
            row[variant] = time_encoder(encoder, batch_size, length, repeats=repeats, warmup=warmup)
            del encoder
        for variant in ("blockwise", "pyramidion"):
            if variant in row and "vanilla" in row:
                ratio = row[variant]["tokens_per_s"] / row["vanilla"]["tokens_per_s"]
                row[f"{variant}_over_vanilla"] = round(ratio, 2)
        if "pyramidion" in row and "blockwise" in row:
            row["pyramidion_over_blockwise"] = round(
                row["pyramidion"]["tokens_per_s"] / row["blockwise"]["tokens_per_s"], 2
            )
        if "pyramidion_default_schedule" in row and "blockwise" in row:
            row["default_schedule_over_blockwise"] = round(
                row["pyramidion_default_schedule"]["tokens_per_s"] / row["blockwise"]["tokens_per_s"], 2
            )
        results.append(row)
    device_name = torch.cuda.get_device_name() if str(device).startswith("cuda") else str(device)
    return {
        "benchmark": "encoder",
        "preset": preset,
        "device": device_name,
        "dtype": dtype,
        "compile": compile,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyramidion-bench encoder", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated source lengths in tokens"
    )
    parser.add_argument("--preset", default="base", choices=tuple(MODEL_PRESETS), help="model size preset")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="time the encoder under torch.compile")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lengths = tuple(int(v) for v in args.lengths.split(","))
    except ValueError:
        parser.error(f"--lengths: got {args.lengths!r}, expected comma-separated integers such as 2048,8192")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    report = run(
        lengths,
        preset=args.preset,
        variants=variants,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        compile=args.compile,
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
