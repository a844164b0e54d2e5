"""The GPU run's first step: every import, version and fallback the benchmarks rely on, as JSON.

``python -m pyramidion_ds.bench.env --output OUT/env.json`` probes torch (CUDA, the GPU), Triton (and whether
the top-k kernels can run), DeepSpeed, and the optimizer the trainer would build (FusedAdam where its JIT
op builds, which it then does once, here, outside every measurement; else the fallback it names). Each
probe is written as soon as it is known, and a failing probe is recorded, not raised: the file says what
is missing even when the rest of the run cannot start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .output import write_json


def _torch() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
    }


def _triton() -> dict:
    import triton

    from ..model import topk_triton

    return {"version": triton.__version__, "available": topk_triton.AVAILABLE, "interpreted": topk_triton.interpreted()}


def _deepspeed() -> dict:
    import deepspeed

    return {"version": deepspeed.__version__}


def _optimizer() -> dict:
    import torch

    from ..config.train import TrainConfig
    from ..engine.optim import make_optimizer

    model = torch.nn.Linear(4, 4, device="cuda" if torch.cuda.is_available() else "cpu")
    return {"optimizer": make_optimizer(model, TrainConfig(), offload=False)[1]}


PROBES = {"torch": _torch, "triton": _triton, "deepspeed": _deepspeed, "optimizer": _optimizer}


def probe(output=None) -> dict:
    report = {"python": sys.version.split()[0], "seconds": {}}
    for name, fn in PROBES.items():
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as err:  # recorded: the point is to say what is missing
            report[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        if output:
            write_json(output, report)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyramidion_ds.bench.env", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="write the JSON here (rewritten after every probe)")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.output), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
