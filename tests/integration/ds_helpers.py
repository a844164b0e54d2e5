"""Helpers for multi-process tests: the real DeepSpeed launcher and real tensorboard event files."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_deepspeed(args: list[str], *, nproc: int = 2, timeout: int = 600, check: bool = True, env: dict | None = None):
    """pyramidion-train under the real DeepSpeed launcher (CPU accelerator, gloo), one process per 'GPU'
    (``env``: variables set for the launch, on top of this process's)."""
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        "--module",
        "pyramidion_ds.cli.train",
        *args,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**subprocess_env(), **(env or {})}, cwd=ROOT, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def tensorboard_scalars(logdir: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar from the real tensorboard event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def gather_zero3_params(config_path, out_path) -> dict:
    """Resume the ZeRO-3 run of ``config_path`` on 2 ranks, gather every parameter (gather_zero3.py)."""
    import torch

    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "integration" / "gather_zero3.py"),
        str(config_path),
        str(out_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_path)
