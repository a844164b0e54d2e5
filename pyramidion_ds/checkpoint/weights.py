"""Model weights without the training state: from a run dir (ZeRO shards) or an export dir.

An export dir (written by ``pyramidion-generate --consolidate``) holds ``model.safetensors``,
``config.yaml`` (the resolved config) and ``spm.model``; ``export.json`` records the source checkpoint
and the vocabulary (its identity and file sha256). safetensors never unpickles; a run dir's shards are
verified against their checksums and read with ``weights_only`` unpickling (see ``safe_load.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.core import read_yaml
from ..errors import UsageError
from .consolidate import consolidated_state_dict
from .export import EXPORT_META, EXPORT_WEIGHTS, is_export_dir
from .manifest import CheckpointDir, CheckpointInfo, Verifier


@dataclass
class InitSource:
    """What ``--init-from`` points at, read without loading any weights (so it can be checked early)."""

    path: Path
    saved_model: dict  #: the model section of its config.yaml
    vocabulary: dict  #: what it records of its vocabulary: spm_identity and/or spm_sha256
    checkpoint: CheckpointInfo | None  #: None for an export dir

    def same_vocabulary(self, identity: str, sha256: str) -> bool | None:
        """Whether it was trained with the vocabulary of this identity (None: nothing recorded)."""
        from ..data import same_vocabulary

        return same_vocabulary(self.vocabulary, identity, sha256, self.path / "spm.model")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights (safetensors for an export, consolidated ZeRO shards for a run dir)."""
        if self.checkpoint is None:
            from safetensors.torch import load_file

            return load_file(str(self.path / EXPORT_WEIGHTS))
        return consolidated_state_dict(self.checkpoint)


def init_source(path: str | Path, warn=lambda msg: None, verify: bool | Verifier = True) -> InitSource:
    """Describe a run dir or export dir for ``--init-from``; one-line errors when it is neither.

    For a run dir: its newest complete checkpoint whose files match their checksums (``verify``: True,
    or a verifier spreading the hashing over the ranks); a corrupt newer one is skipped with a warning."""
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
        return InitSource(path, saved_model, _vocabulary(meta), None)
    info = CheckpointDir(path).latest_complete(warn=warn, verify=verify)
    if info is None:
        raise UsageError(f"train.init_from: '{path}' holds no complete checkpoint (checkpoints/latest)")
    info.check_pickles()
    return InitSource(path, saved_model, _vocabulary(info.manifest), info)


def _vocabulary(record: dict) -> dict:
    return {key: record[key] for key in ("spm_identity", "spm_sha256") if record.get(key)}
