"""Preemption-safe checkpoints on top of DeepSpeed's sharded ``save_checkpoint``.

Layout of a run directory::

    RUN/config.yaml, ds_config.json, spm.model      resolved configs and the vocabulary
    RUN/checkpoints/update_0000100/                  one DeepSpeed tag: every rank's shards
                    ├── mp_rank_00_model_states.pt   (+ client state: update, sampler, RNG, best, ...)
                    ├── *_optim_states.pt            one per rank under ZeRO
                    └── manifest.json                written last: files, sizes, world size, update
    RUN/checkpoints/latest                           tag of the newest *complete* checkpoint
    RUN/checkpoints/best                             tag of the best one (kept when pruning)

DeepSpeed itself moves ``latest`` as soon as rank 0 has written its own files; we save with
``save_latest=False``, wait for every rank (DeepSpeed ends ``save_checkpoint`` with a barrier), then
rank 0 writes the manifest and only then replaces ``latest`` (temp file + rename). A tag whose manifest
is missing or whose files no longer match it (a truncated shard) is incomplete: loading falls back to
the newest complete one, with a warning.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

TAG_PREFIX = "update_"
MANIFEST = "manifest.json"


def tag_for(update: int) -> str:
    return f"{TAG_PREFIX}{update:07d}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class CheckpointInfo:
    tag: str
    path: Path
    manifest: dict

    @property
    def update(self) -> int:
        return int(self.manifest["update"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])


class CheckpointDir:
    """The ``checkpoints/`` folder of a run: completeness, ``latest``, ``best``, pruning."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir) / "checkpoints"

    # ---------------------------------------------------------------- reading
    def problem(self, tag: str) -> str | None:
        """Why ``tag`` is not a complete checkpoint, or None when it is."""
        path = self.root / tag
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return f"{path} has no {MANIFEST} (the save did not finish)"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = manifest["files"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            return f"{manifest_path} is unreadable"
        for name, size in files.items():
            file = path / name
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size != size:
                return f"{file} is {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
        return None

    def info(self, tag: str) -> CheckpointInfo:
        path = self.root / tag
        return CheckpointInfo(tag, path, json.loads((path / MANIFEST).read_text(encoding="utf-8")))

    def tags(self) -> list[str]:
        """Every tag on disk, newest first (complete or not)."""
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)),
                      reverse=True)

    def read_pointer(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None

    def latest_complete(self, warn=print) -> CheckpointInfo | None:
        """The checkpoint ``latest`` names, or the newest complete one before it when that is broken."""
        pointed = self.read_pointer("latest")
        candidates = self.tags()
        if pointed in candidates:  # try what latest names first, then older ones
            candidates = [pointed] + [t for t in candidates if t < pointed]
        for tag in candidates:
            problem = self.problem(tag)
            if problem is None:
                if tag != pointed and pointed is not None:
                    warn(f"checkpoint '{pointed}' is incomplete; falling back to '{tag}'")
                return self.info(tag)
            warn(f"skipping checkpoint '{tag}': {problem}")
        return None

    # ---------------------------------------------------------------- writing (rank 0, after the barrier)
    def finalize(self, tag: str, *, update: int, world_size: int, extra: dict | None = None) -> None:
        """Record what every rank wrote under ``tag``, then point ``latest`` at it."""
        path = self.root / tag
        files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
                 if p.is_file() and p.name != MANIFEST}
        manifest = {"tag": tag, "update": update, "world_size": world_size, "files": files, **(extra or {})}
        write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
        write_text_atomic(self.root / "latest", tag)

    def mark_best(self, tag: str) -> None:
        write_text_atomic(self.root / "best", tag)

    def prune(self, keep_last: int) -> list[str]:
        """Delete complete checkpoints beyond the newest ``keep_last``, never ``best`` or ``latest``."""
        if keep_last <= 0:
            return []
        protected = {self.read_pointer("best"), self.read_pointer("latest")}
        complete = [t for t in self.tags() if self.problem(t) is None]
        removed = []
        for tag in complete[keep_last:]:
            if tag not in protected:
                shutil.rmtree(self.root / tag, ignore_errors=True)
                removed.append(tag)
        return removed


def consolidated_state_dict(info: CheckpointInfo) -> dict:
    """Full fp32 weights of a checkpoint, whatever its ZeRO stage and world size."""
    if int(info.manifest.get("zero_stage", 0)) == 0:
        import torch
        states = torch.load(info.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {name: tensor.float() for name, tensor in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(info.path.parent), tag=info.tag)
