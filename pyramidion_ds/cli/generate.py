"""pyramidion-generate: consolidate a ZeRO checkpoint and run beam search (fairseq-generate flags)."""
from __future__ import annotations

import argparse
import sys

from .common import not_built, run_main

PROG = "pyramidion-generate"


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="Summarize documents with a trained model: "
                                     "consolidate ZeRO shards, beam search with a KV cache, ROUGE.")
    parser.add_argument("path", help="run directory (ZeRO checkpoints) or export directory")
    return parser


def main(argv: list[str] | None = None):
    def body():
        build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        not_built(PROG, 8, "generation (consolidation, beam search, ROUGE)")
    run_main(PROG, body)


if __name__ == "__main__":
    main()
