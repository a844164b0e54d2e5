"""pyramidion-tune: pick the ZeRO stage, offload and micro-batch that fit a cluster."""
from __future__ import annotations

import argparse
import sys

from .common import not_built, run_main

PROG = "pyramidion-tune"


def build_parser():
    return argparse.ArgumentParser(prog=PROG, description="Estimate per-GPU memory for each ZeRO stage and "
                                   "offload choice, pick the fastest that fits, write a DeepSpeed JSON.")


def main(argv: list[str] | None = None):
    def body():
        build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        not_built(PROG, 7, "the ZeRO tuner")
    run_main(PROG, body)


if __name__ == "__main__":
    main()
