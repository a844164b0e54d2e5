"""Model weights without the training state: from a run dir (ZeRO shards) or an export dir.

An export dir (written by ``pyramidion-generate --consolidate``) holds ``model.safetensors``,
``config.yaml`` (the resolved config) and ``spm.model``; ``export.json`` records the source checkpoint
and the sentencepiece hash. safetensors never unpickles.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli.common import UsageError
from ..config.core import read_yaml
from .checkpoint import CheckpointDir, CheckpointInfo, consolidated_state_dict

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_META = "export.json"


def is_export_dir(path: Path) -> bool:
    return (path / EXPORT_WEIGHTS).is_file()


@dataclass
class InitSource:
    """What ``--init-from`` points at, read without loading any weights (so it can be checked early)."""
    path: Path
    saved_model: dict          #: the model section of its config.yaml
    spm_sha256: str | None
    checkpoint: CheckpointInfo | None  #: None for an export dir

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights (safetensors for an export, consolidated ZeRO shards for a run dir)."""
        if self.checkpoint is None:
            from safetensors.torch import load_file
            return load_file(str(self.path / EXPORT_WEIGHTS))
        return consolidated_state_dict(self.checkpoint)


def init_source(path: str | Path) -> InitSource:
    """Describe a run dir or export dir for ``--init-from``; one-line errors when it is neither."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"train.init_from: '{path}' is not a directory (expected a run dir or an export dir)")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise UsageError(f"train.init_from: '{path}' has no config.yaml (not a run dir or export dir)")
    saved_model = read_yaml(config_path).get("model", {})
    if is_export_dir(path):
        meta_path = path / EXPORT_META
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        return InitSource(path, saved_model, meta.get("spm_sha256"), None)
    info = CheckpointDir(path).latest_complete(warn=lambda msg: None)
    if info is None:
        raise UsageError(f"train.init_from: '{path}' holds no complete checkpoint (checkpoints/latest)")
    return InitSource(path, saved_model, info.manifest.get("spm_sha256"), info)
