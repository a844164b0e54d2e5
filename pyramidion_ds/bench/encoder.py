"""pyramidion-bench encoder: encoder forward + backward tokens/s for the four variants, same run, same machine.

Pyramidion runs with its widths halving after every layer (n/2, n/4, ...) and, as a second entry, with the
config's default schedule (the one training uses unless a config sets its own); the report gives each
variant's tokens/s and the pyramidion/blockwise ratio. ``--output FILE`` rewrites FILE after every length,
so a run cut short keeps the lengths it measured (:mod:`.output`); a variant that fails (e.g. out of
memory at 64k) is recorded as an error and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from pyramidion_ds.config.model import MODEL_PRESETS, ModelConfig
from pyramidion_ds.model.encoder import Encoder

from .output import ReportFile

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
        out = encoder(embedded.requires_grad_(True), real_mask, padded=False)  # no padding: no mask
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
    output=None,
) -> dict:
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    device_name = torch.cuda.get_device_name() if str(device).startswith("cuda") else str(device)
    report = ReportFile(
        output,
        {
            "benchmark": "encoder",
            "preset": preset,
            "device": device_name,
            "dtype": dtype,
            "compile": compile,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        rows_key="results",
    )
    for length in lengths:
        row = {"length": length, "batch_size": batch_size}
        for variant in variants:
            torch.manual_seed(0)
            try:
                encoder = make_encoder(variant, preset, length, device, torch_dtype)
                if compile:  # fuses the top-k's score-side rounds and the layers' elementwise chains
                    compiled = torch.compile(encoder)
                    compiled.cfg, compiled.widths = encoder.cfg, encoder.widths
                    encoder = compiled
                row[variant] = time_encoder(encoder, batch_size, length, repeats=repeats, warmup=warmup)
            except Exception as err:  # e.g. out of memory: record it and measure the rest
                row[variant] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
            encoder = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        add_ratios(row)
        report.add(row)
    return report.finish()


def add_ratios(row: dict) -> None:
    """Tokens/s ratios between the variants of one length row (those that ran)."""

    def ratio(variant, reference):
        if "tokens_per_s" in row.get(variant, {}) and "tokens_per_s" in row.get(reference, {}):
            return round(row[variant]["tokens_per_s"] / row[reference]["tokens_per_s"], 2)
        return None

    for name, variant, reference in (
        ("blockwise_over_vanilla", "blockwise", "vanilla"),
        ("pyramidion_over_vanilla", "pyramidion", "vanilla"),
        ("pyramidion_over_blockwise", "pyramidion", "blockwise"),
        ("default_schedule_over_blockwise", "pyramidion_default_schedule", "blockwise"),
    ):
        value = ratio(variant, reference)
        if value is not None:
            row[name] = value


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
    parser.add_argument("--output", default=None, help="also write the JSON here, rewritten after every length")
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
        output=args.output,
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
