"""Model weights without the training state: from a run dir (ZeRO shards) or an export dir.

An export dir (written by ``pyramidion-generate --consolidate``) holds ``model.safetensors``,
``config.yaml`` (the resolved config) and ``spm.model``; ``export.json`` records the source checkpoint
and the sentencepiece hash. safetensors never unpickles.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..cli.common import UsageError
from ..config.core import read_yaml
from .checkpoint import CheckpointDir, consolidated_state_dict

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_META = "export.json"


def is_export_dir(path: Path) -> bool:
    return (path / EXPORT_WEIGHTS).is_file()


def load_weights_for_init(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str | None]:
    """(fp32 state dict, saved model config as a dict, spm sha256 or None) for ``--init-from``."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"train.init_from: '{path}' is not a directory (expected a run dir or an export dir)")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise UsageError(f"train.init_from: '{path}' has no config.yaml (not a run dir or export dir)")
    saved_model = read_yaml(config_path).get("model", {})
    if is_export_dir(path):
        from safetensors.torch import load_file
        meta_path = path / EXPORT_META
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        return load_file(str(path / EXPORT_WEIGHTS)), saved_model, meta.get("spm_sha256")
    info = CheckpointDir(path).latest_complete(warn=lambda msg: None)
    if info is None:
        raise UsageError(f"train.init_from: '{path}' holds no complete checkpoint (checkpoints/latest)")
    return consolidated_state_dict(info), saved_model, info.manifest.get("spm_sha256")
