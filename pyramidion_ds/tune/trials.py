"""pyramidion-tune's checks against the real code, for the configuration the plan chose.

    check_outputs         the written DeepSpeed JSON + trainer overrides through our merge and DeepSpeed's parser
    measure_activations   one real forward+backward at the chosen micro-batch (``measure.py``)
    prepare_trial         a run config for a few real updates, and the DeepSpeed launcher command for it
    run_trial             launch it and read the peak memory its train.log reports

The command line (``pyramidion_ds.cli.tune``) prints what these return and decides the exit code.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .measure import Measurement
from .plan import Candidate, override_flags

#: the training log's peak-memory field (``engine``'s update lines: ``peak_mem_gib 1.234``)
PEAK_MEM = re.compile(r"peak_mem_gib ([0-9.e+-]+)")


def _run_overrides(overrides: dict) -> list[str]:
    """The trainer flags of ``overrides`` without the model section (the run config already holds the model)."""
    return override_flags({k: v for k, v in overrides.items() if k != "model"})


def check_outputs(ds: dict, overrides: dict, world_size: int, config: str | None) -> dict:
    """The written JSON must pass our merge and DeepSpeed's own parser with the written overrides."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from ..config import load_config
    from ..engine import resolve_ds_config

    cfg = load_config(config, _run_overrides(overrides))
    resolved = resolve_ds_config(ds, cfg, world_size, source="tuned ds_config.json")
    check = dict(resolved)
    check.pop("train_batch_size")  # DeepSpeed derives it with its own (here: 1) world size
    DeepSpeedConfig(check)
    return resolved


def measure_activations(m, chosen: Candidate, precision: str, device: str) -> Measurement:
    """One real step of ``chosen``'s micro-batch and checkpointing; ``device`` is the cluster's (gpu, cpu):
    CUDA where there is one and the cluster has GPUs, else the CPU."""
    import torch

    from .measure import measure_activation_peak

    where = "cuda" if torch.cuda.is_available() and device == "gpu" else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return measure_activation_peak(
        m,
        chosen.micro_batch,
        m.max_source_positions,
        m.max_target_positions,
        dtype=dtype,
        checkpointing=chosen.checkpointing,
        device=where,
    )


@dataclass
class Trial:
    """A few real updates of the chosen configuration under the DeepSpeed launcher."""

    command: list[str]
    log_path: Path  #: the run's train.log, where the peak memory of every update is reported


@dataclass
class TrialResult:
    returncode: int
    stderr: str
    peaks_gib: list[float]  #: ``peak_mem_gib`` of every logged update

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.peaks_gib)


def prepare_trial(cfg, m, overrides: dict, data: str, updates: int, out: Path, ranks: int) -> Trial:
    """Write ``out/measure_config.yaml`` (the tuned model on ``data``, ``updates`` updates logged one by one,
    no validation, no checkpoints, into ``out/measure_run``) and the launcher command for ``ranks`` ranks."""
    import yaml

    from ..config import to_dict

    run_dir = out / "measure_run"
    config = to_dict(cfg)
    config["model"] = to_dict(m)
    config["data"].update(data=str(data), num_workers=0)
    config["train"].update(
        save_dir=str(run_dir),
        max_update=updates,
        log_interval=1,
        validate_interval_updates=0,
        save_interval_updates=0,
        resume=False,
    )
    config_path = out / "measure_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--module",
        "pyramidion_ds.cli.train",
        str(config_path),
        *_run_overrides(overrides),
    ]
    return Trial(command, run_dir / "train.log")


def read_peaks(log_path: Path) -> list[float]:
    """Every ``peak_mem_gib`` a training log reports (none when there is no log)."""
    return [float(x) for x in PEAK_MEM.findall(log_path.read_text())] if log_path.is_file() else []


def run_trial(trial: Trial) -> TrialResult:
    proc = subprocess.run(trial.command, capture_output=True, text=True)
    return TrialResult(proc.returncode, proc.stderr, read_peaks(trial.log_path))
