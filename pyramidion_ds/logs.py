"""One logger for the whole package: rank 0 speaks at INFO, other ranks only warn.

setup_logging(rank, log_file=RUN/train.log)   # once, after rank discovery
log = logging.getLogger(__name__)             # everywhere else, as usual
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"


def setup_logging(rank: int = 0, log_file: str | Path | None = None) -> logging.Logger:
    quiet_deepspeed_accelerator_probe()
    root = logging.getLogger("pyramidion_ds")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    formatter = logging.Formatter(FORMAT if rank == 0 else f"[rank {rank}] {FORMAT}", "%Y-%m-%d %H:%M:%S")
    stream = ProgressBarSafeHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    return root


class ProgressBarSafeHandler(logging.StreamHandler):
    """Writes each record through ``tqdm.write``: an open progress bar (training, binarizing, generation) is
    cleared, the line printed above it, and the bar drawn again, instead of the two sharing a line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler: a broken stream must not stop the run
            self.handleError(record)


def is_rank_0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def quiet_deepspeed_accelerator_probe() -> None:
    """Where torch is loaded and sees no CUDA device, tell DeepSpeed it runs on the CPU before it is imported,
    so it does not warn "Setting accelerator to CPU. If you have GPU ... unable to detect it" (see
    ``distributed.env.use_cpu_accelerator``). Does nothing before torch is imported: logging stays cheap."""
    torch = sys.modules.get("torch")
    if torch is not None and not torch.cuda.is_available():
        from .distributed.env import use_cpu_accelerator

        use_cpu_accelerator()
