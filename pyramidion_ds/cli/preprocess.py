"""pyramidion-preprocess: sentencepiece + binarized mmap shards (fairseq-preprocess flags)."""
from __future__ import annotations

import argparse
import sys

from .common import not_built, run_main

PROG = "pyramidion-preprocess"


def build_parser():
    return argparse.ArgumentParser(prog=PROG, description="Train or load a sentencepiece model and "
                                   "binarize documents and summaries into memory-mapped shards.")


def main(argv: list[str] | None = None):
    def body():
        build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        not_built(PROG, 4, "the data pipeline")
    run_main(PROG, body)


if __name__ == "__main__":
    main()
