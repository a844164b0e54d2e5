"""pyramidion-bench SUITE [flags]: benchmarks that print JSON and compare against an in-run baseline."""

from __future__ import annotations

import importlib
import sys

from ..errors import EXIT_USAGE
from .common import fail, run_main

PROG = "pyramidion-bench"

#: suite -> (module under pyramidion_ds.bench, what it measures)
SUITES = {
    "topk": ("topk", "successive-halving top-k fwd+bwd: torch path, compiled, Triton, per-example reference"),
    "encoder": ("encoder", "encoder fwd+bwd tokens/s per variant and length"),
    "data": ("data", "binarization docs/s, tokens/s; mmap reader memory"),
    "train": ("train", "training tokens/s, MFU, peak memory per variant and ZeRO stage"),
    "generate": ("generate", "beam search seconds vs no-cache and HF BART"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {desc}" for name, (_, desc) in SUITES.items())
    return f"usage: {PROG} SUITE [flags]   (SUITE --help for its flags)\n\nsuites:\n{rows}"


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv

    def body():
        if not argv or argv[0] in ("-h", "--help"):
            print(usage())
            return 0 if argv else EXIT_USAGE
        name, rest = argv[0], argv[1:]
        if name not in SUITES:
            fail(PROG, f"unknown suite '{name}', expected one of {', '.join(SUITES)}")
        module = importlib.import_module(f"pyramidion_ds.bench.{SUITES[name][0]}")
        return module.main(rest)

    run_main(PROG, body)


if __name__ == "__main__":
    main()
