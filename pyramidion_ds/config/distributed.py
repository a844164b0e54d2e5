"""Distributed section of the config: how ranks find each other."""

from __future__ import annotations

from dataclasses import dataclass

from .core import option


@dataclass
class DistributedConfig:
    backend: str = option(
        "auto",
        "torch.distributed backend: auto (nccl on GPU, gloo on CPU), nccl, gloo",
        choices=("auto", "nccl", "gloo"),
    )
    timeout_minutes: int = option(30, "collective timeout", min=1)
