"""pyramidion-import: a Hugging Face PEGASUS or BART checkpoint (local dir) -> a Pyramidion export dir.

    huggingface-cli download google/pegasus-large --local-dir exports/hf/pegasus-large
    pyramidion-import exports/hf/pegasus-large pegasus-pyr --variant pyramidion --max-source-positions 8192 \\
        --pooling-schedule '{1: 4096, 3: 2048}'
    pyramidion-preprocess ... --spm-model pegasus-pyr        # binarize with the imported tokenizer
    pyramidion-train CONFIG --init-from pegasus-pyr ...       # fine-tune (or continue pretraining)
    pyramidion-generate pegasus-pyr --input docs.txt          # or generate right away

The export holds config.yaml, model.safetensors, the tokenizer and export.json. See docs/pretrained.md.
"""

from __future__ import annotations

import argparse
import sys

from ..config import VARIANTS
from .common import run_main
from .preprocess import _positive

PROG = "pyramidion-import"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Import a Hugging Face PEGASUS (PegasusForConditionalGeneration) or BART "
        "(BartForConditionalGeneration) model dir as a Pyramidion export dir.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("hf_dir", help="local Hugging Face model dir (config.json, weights, tokenizer files)")
    parser.add_argument("out_dir", help="export dir to write (must not exist, or be empty)")
    parser.add_argument(
        "--variant", choices=VARIANTS, default="pyramidion", help="encoder variant (default: %(default)s)"
    )
    parser.add_argument(
        "--max-source-positions",
        type=_positive,
        help="the encoder's input width (default: the checkpoint's max_position_embeddings); BART's learned "
        "positions beyond the checkpoint's are copies of its table",
    )
    parser.add_argument(
        "--pooling-schedule",
        help="encoder output width per layer, e.g. '{1: 4096, 3: 2048}' or '[8192,4096,...]' (default: halving)",
    )
    parser.add_argument("--chunk-size", type=_positive, help="blockwise attention chunk (default: min(512, width))")
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="weights dtype (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None):
    def body():
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        from ..checkpoint.hf_import import import_hf
        from ..config.core import parse_scalar

        schedule = parse_scalar(args.pooling_schedule) if args.pooling_schedule else None
        out = import_hf(
            args.hf_dir,
            args.out_dir,
            variant=args.variant,
            max_source_positions=args.max_source_positions,
            pooling_schedule=schedule,
            chunk_size=args.chunk_size,
            dtype=args.dtype,
        )
        print(f"{PROG}: wrote {out}")

    run_main(PROG, body)


if __name__ == "__main__":
    main()
