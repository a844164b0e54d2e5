"""Preemption-safe, checksummed checkpoints on top of DeepSpeed's sharded ``save_checkpoint``.

Layout of a run directory::

    RUN/config.yaml, ds_config.json, spm.model      resolved configs and the vocabulary
    RUN/checkpoints/update_0000100/                  one DeepSpeed tag: every rank's shards
                    ├── mp_rank_00_model_states.pt   (+ client state: update, sampler, RNG, best, ...)
                    ├── *_optim_states.pt            one per rank under ZeRO
                    └── manifest.json                written last: size + sha256 of every file,
                                                     world size, update, vocabulary identity
    RUN/checkpoints/latest                           tag of the newest *complete* checkpoint
    RUN/checkpoints/best                             tag of the best one (kept when pruning)

DeepSpeed itself moves ``latest`` as soon as rank 0 has written its own files; we save with
``save_latest=False``, wait for every rank (DeepSpeed ends ``save_checkpoint`` with a barrier), then
rank 0 writes the manifest and only then replaces ``latest`` (temp file + rename). Each rank hashes the
files it writes while writing them (``files.py``, DeepSpeed's checkpoint-engine hook), so
the manifest costs no second read. A tag whose manifest is missing or whose files no longer match it
(a truncated shard, or, when verified, a changed byte) is incomplete: loading falls back to the newest
complete one, with a warning naming the file.

Every ``.pt`` file is unpickled without running code (``safe_load.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from .safe_load import CheckpointError, safe_globals, safe_torch_load

TAG_PREFIX = "update_"
MANIFEST = "manifest.json"
HASH_BLOCK = 1 << 22
EXPORT_WEIGHTS = "model.safetensors"  #: the weights file that makes a directory an export dir (export.py)

#: checks a complete checkpoint beyond sizes (its checksums): why it is broken, or None
Verifier = Callable[["CheckpointInfo"], "str | None"]


def check_model_dir(path: str | os.PathLike) -> None:
    """One-line UsageError unless ``path`` is an export dir or a directory with a run's config.yaml.
    Imports no torch: pyramidion-generate calls it before it loads anything."""
    path = Path(path)
    if (path / EXPORT_WEIGHTS).is_file():
        return
    if not path.is_dir():
        raise UsageError(f"'{path}' is not a directory (expected a run dir or an export dir)")
    if not (path / "config.yaml").is_file():
        raise UsageError(f"'{path}' has no config.yaml: not a run dir (pyramidion-train save_dir) nor an export dir")


def tag_for(update: int) -> str:
    return f"{TAG_PREFIX}{update:07d}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry(value) -> tuple[int, str | None]:
    """(size, sha256 or None) of a manifest ``files`` entry; older manifests record the size only."""
    if isinstance(value, dict):
        return int(value["size"]), value.get("sha256")
    return int(value), None


@dataclass
class CheckpointInfo:
    tag: str
    path: Path
    manifest: dict
    manifest_sha256: str = ""  #: identity of this checkpoint (sha256 of its manifest.json)

    @property
    def update(self) -> int:
        return int(self.manifest["update"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    @property
    def zero_stage(self) -> int:
        return int(self.manifest.get("zero_stage", 0))

    @property
    def has_checksums(self) -> bool:
        return all(_entry(v)[1] for v in self.manifest["files"].values())

    def checksum_problem(self, names: list[str] | None = None) -> str | None:
        """Why a file among ``names`` (default: all) differs from its recorded sha256, or None."""
        for name in self.manifest["files"] if names is None else names:
            size, sha = _entry(self.manifest["files"][name])
            if sha is not None and file_sha256(self.path / name) != sha:
                return f"{self.path / name} does not match the sha256 in its {MANIFEST} (corrupt)"
        return None

    def check_pickles(self) -> None:
        """Refuse, before anything is loaded or written, a ``.pt`` file whose pickle names a class outside
        :func:`safe_globals` (e.g. ``os.system`` in a crafted file). Reads the pickle opcodes only, not the
        tensors; a file in torch's older non-zip format has no separate pickle, so it is loaded whole with
        :func:`safe_torch_load` here (refused the same way, before anything is written)."""
        import torch

        allowed = safe_globals()
        for name in sorted(self.manifest["files"]):
            path = self.path / name
            if not name.endswith(".pt"):
                continue
            if not zipfile.is_zipfile(path):
                safe_torch_load(path, map_location="cpu")
                continue
            try:
                with torch.serialization.safe_globals(allowed):
                    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except (RuntimeError, ValueError, KeyError, EOFError, IndexError) as err:
                raise CheckpointError(
                    f"'{path}' is not a readable checkpoint file "
                    f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                ) from None
            if unsafe:
                raise CheckpointError(
                    f"refusing to load '{path}': its pickle names {unsafe[0]}, which is not a "
                    f"tensor or plain data (loading it could run code)"
                )


class CheckpointDir:
    """The ``checkpoints/`` folder of a run: completeness, checksums, ``latest``, ``best``, pruning."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir) / "checkpoints"

    # ---------------------------------------------------------------- reading
    def problem(self, tag: str) -> str | None:
        """Why ``tag`` is not a complete checkpoint (manifest, files, sizes), or None when it is."""
        path = self.root / tag
        manifest_path = path / MANIFEST
        outside = self.outside_link(path) or self.outside_link(manifest_path)
        if outside:
            return outside
        if not manifest_path.is_file():
            return f"{path} has no {MANIFEST} (the save did not finish)"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = {name: _entry(value) for name, value in manifest["files"].items()}
            int(manifest["update"]), int(manifest["world_size"])
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError, ValueError, AttributeError):
            return f"{manifest_path} is unreadable"
        for name, (size, _) in files.items():
            file = path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                return f"{manifest_path} names a file outside the checkpoint ({name})"
            outside = self.outside_link(file)
            if outside:
                return outside
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size != size:
                return f"{file} is {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
        return None

    def outside_link(self, path: Path) -> str | None:
        """Why ``path`` (in a tag dir) is refused: it is, or is under, a symlink that leads out of the run
        dir (a checkpoint reads and writes only its own run dir); None otherwise."""
        run_dir = self.root.parent.resolve()
        target = path.resolve()
        if target == run_dir or run_dir in target.parents:
            return None
        return f"{path} is a symbolic link to {target}, outside the run dir {run_dir}"

    def info(self, tag: str) -> CheckpointInfo:
        path = self.root / tag
        raw = (path / MANIFEST).read_bytes()
        return CheckpointInfo(tag, path, json.loads(raw), hashlib.sha256(raw).hexdigest())

    def tags(self) -> list[str]:
        """Every tag on disk, newest first (complete or not)."""
        if not self.root.is_dir():
            return []
        return sorted(
            (p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)), reverse=True
        )

    def read_pointer(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None

    def latest_complete(self, warn=print, verify: bool | Verifier = False) -> CheckpointInfo | None:
        """The checkpoint ``latest`` names, or the newest complete one before it when that is broken.

        ``verify``: also compare every file with its sha256 (True), or call this verifier with the
        checkpoint (e.g. one that spreads the hashing over the ranks). Checkpoints written before manifests had
        checksums pass on sizes, with a note.
        """
        pointed = self.read_pointer("latest")
        candidates = self.tags()
        if pointed in candidates:  # try what latest names first, then older ones
            candidates = [pointed] + [t for t in candidates if t < pointed]
        for tag in candidates:
            problem = self.problem(tag)
            if problem is None and verify:
                info = self.info(tag)
                if not info.has_checksums:
                    warn(
                        f"checkpoint '{tag}' records no checksums (written by an older version): "
                        f"checked file sizes only"
                    )
                problem = info.checksum_problem() if verify is True else verify(info)
            if problem is None:
                if tag != pointed and pointed is not None:
                    warn(f"checkpoint '{pointed}' is incomplete or corrupt; falling back to '{tag}'")
                return self.info(tag)
            warn(f"skipping checkpoint '{tag}': {problem}")
        return None

    # ---------------------------------------------------------------- writing (rank 0, after the barrier)
    def finalize(
        self,
        tag: str,
        *,
        update: int,
        world_size: int,
        extra: dict | None = None,
        digests: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        """Record what every rank wrote under ``tag`` (size + sha256), then point ``latest`` at it.

        ``digests``: name -> (size, sha256) as hashed while writing; a file missing there, or whose size
        changed since, is hashed now."""
        path = self.root / tag
        digests = digests or {}
        files = {}
        for file in sorted(path.rglob("*")):
            if not file.is_file() or file.name == MANIFEST:
                continue
            name, size = str(file.relative_to(path)), file.stat().st_size
            known = digests.get(name)
            sha = known[1] if known and known[0] == size else file_sha256(file)
            files[name] = {"size": size, "sha256": sha}
        manifest = {"tag": tag, "update": update, "world_size": world_size, "files": files, **(extra or {})}
        write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
        write_text_atomic(self.root / "latest", tag)

    def begin(self, tag: str) -> None:
        """Before saving into ``tag``: a tag written again (a ``--no-resume`` retrain) is incomplete until
        its new manifest is written, so a save that dies half-way never passes for the old checkpoint."""
        (self.root / tag / MANIFEST).unlink(missing_ok=True)

    def discard(self, tag: str) -> None:
        """Remove a checkpoint whose save failed (``latest`` never named it)."""
        shutil.rmtree(self.root / tag, ignore_errors=True)

    def mark_best(self, tag: str) -> None:
        write_text_atomic(self.root / "best", tag)

    def prune(self, keep_last: int) -> list[str]:
        """Delete complete checkpoints beyond the newest ``keep_last``, never ``best`` or ``latest``.
        Completeness is judged on sizes: nothing is hashed at each save."""
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


def stale_layout_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why a DeepSpeed tag directory must not be resumed, or None: one written before the attention
    projections were fused holds optimizer state (ZeRO's flat fp32 partitions, Adam moments) in the old
    parameter order, which would load without an error into the wrong parameters. Its weights still load
    (``--train.init_from``, which converts them)."""
    from ..model.attention import PRE_FUSION_PROJECTIONS

    states_path = Path(checkpoint_dir) / "mp_rank_00_model_states.pt"
    if not states_path.is_file():
        return None
    states = safe_torch_load(states_path, map_location="cpu", mmap=True)  # only the names are needed
    names = set(states.get("module") or {})
    for shapes in states.get("param_shapes") or []:
        names.update(shapes)
    stale = sorted(name for name in names if set(name.split(".")) & set(PRE_FUSION_PROJECTIONS))
    if not stale:
        return None
    return (
        f"checkpoint '{checkpoint_dir}' was written before the attention projections were fused (it has "
        f"'{stale[0]}'), so its optimizer state cannot be restored; continue from its weights with "
        f"--train.init_from {Path(checkpoint_dir).parent.parent} and a new --train.save_dir"
    )
