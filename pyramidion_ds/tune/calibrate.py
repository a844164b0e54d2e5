"""Print the estimate-vs-measured activation table (markdown) for the docs: ``python -m pyramidion_ds.tune.calibrate``.

    python -m pyramidion_ds.tune.calibrate --device cpu --dtype fp32 --presets debug,base
    python -m pyramidion_ds.tune.calibrate --device cuda --dtype bf16

Three schedules per preset (the default halving, the original release's two-step form, a late-pooling one) ×
the three checkpointing modes; each row is one real forward+backward (``measure.py``) next to
``activation_bytes``.
"""

from __future__ import annotations

import argparse

import torch

from ..config import ModelConfig
from .measure import measure_activation_peak
from .memory import activation_bytes

SCHEDULES = {
    "debug": [None, "{0: 128}", [512, 512, 512]],
    "base": [None, "{0: 2048, 1: 512}", [8192, 8192, 8192, 2048, 2048, 512]],
}
BATCH = {"debug": 4, "base": 1}
VOCAB = {"debug": 256, "base": 32000}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--presets", default="debug,base")
    p.add_argument("--batch", type=int, default=0, help="0 = per preset (debug 4, base 1)")
    args = p.parse_args(argv)
    print(
        "| preset | device | dtype | B | encoder widths | checkpointing | measured MiB | estimate MiB "
        "| estimate/measured |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        batch = args.batch or BATCH[preset]
        for schedule in SCHEDULES[preset]:
            for ckpt in ("off", "stage", "layer"):
                m = ModelConfig(preset=preset, vocab_size=VOCAB[preset], pooling_schedule=schedule)
                got = measure_activation_peak(
                    m,
                    batch,
                    m.max_source_positions,
                    m.max_target_positions,
                    dtype=DTYPES[args.dtype],
                    checkpointing=ckpt,
                    device=args.device,
                )
                est = activation_bytes(
                    m, batch, m.max_source_positions, m.max_target_positions, precision=args.dtype, checkpointing=ckpt
                )
                print(
                    f"| {preset} | {args.device} | {args.dtype} | {batch} | {m.encoder_widths()} | {ckpt} | "
                    f"{got.peak_bytes / 2**20:.1f} | {est.peak_bytes / 2**20:.1f} | "
                    f"{est.peak_bytes / got.peak_bytes:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
