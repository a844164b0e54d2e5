"""The files DeepSpeed writes and reads, through its checkpoint-engine hook.

Each rank hashes the files it writes while writing them (:func:`checkpoint_files`), so the manifest
(``manifest.py``) costs no second read; a full disk becomes a recorded error rather than an exception, so
every rank still reaches DeepSpeed's closing barrier; every file is read back with :func:`safe_torch_load`.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from .safe_load import safe_torch_load


class _HashingWriter:
    """A write-only file that hashes what goes through it (torch.save writes sequentially)."""

    def __init__(self, fh):
        self.fh, self.digest, self.size = fh, hashlib.sha256(), 0
        self.error: OSError | None = None  #: torch's zip writer reports a failed write as a RuntimeError

    def write(self, data) -> int:
        self.digest.update(data)
        try:
            written = self.fh.write(data)
        except OSError as err:
            self.error = err
            raise
        self.size += len(memoryview(data).cast("B"))
        return written

    def flush(self) -> None:
        self.fh.flush()


_ENGINE_CLASS = None


def checkpoint_files(config_params=None):
    """A DeepSpeed checkpoint engine that writes each file while hashing it, records (size, sha256) per
    path, turns a full disk into a recorded error instead of an exception (so every rank still reaches
    DeepSpeed's closing barrier), and loads with :func:`safe_torch_load`."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        class CheckpointFiles(TorchCheckpointEngine):
            def __init__(self, config_params=None):
                super().__init__(config_params)
                self.written: dict[str, tuple[int, str]] = {}  #: absolute path -> (size, sha256)
                self.error: OSError | None = None

            def save(self, state_dict, path: str):
                import torch

                if self.error is not None:  # the disk is full: write nothing more this save
                    return
                writer = None
                try:
                    with open(path, "wb") as fh:
                        writer = _HashingWriter(fh)
                        torch.save(state_dict, writer, _use_new_zipfile_serialization=self.zipfile_serialization)
                        fh.flush()
                        os.fsync(fh.fileno())
                except (OSError, RuntimeError) as err:
                    cause = writer.error if writer is not None and writer.error is not None else err
                    if not isinstance(cause, OSError):
                        raise
                    cause.filename = cause.filename or path
                    self.error = cause
                    Path(path).unlink(missing_ok=True)
                    return
                self.written[os.path.abspath(path)] = (writer.size, writer.digest.hexdigest())

            def load(self, path: str, map_location=None):
                return safe_torch_load(path, map_location=map_location)

        _ENGINE_CLASS = CheckpointFiles
    return _ENGINE_CLASS(config_params)


def install_checkpoint_files(engine):
    """Make a DeepSpeed engine save and load through :func:`checkpoint_files`; returns that object.

    DeepSpeed's own copy of its recovery scripts into each ZeRO checkpoint (rank 0) is guarded the same
    way, so a full disk there is recorded too instead of leaving the other ranks in the closing barrier.
    """
    files = checkpoint_files(getattr(engine, "_config", None))
    engine.checkpoint_engine = files
    copy_scripts = getattr(engine, "_copy_recovery_script", None)
    if copy_scripts is not None:

        def guarded_copy(save_path):
            try:
                copy_scripts(save_path)
            except OSError as err:
                files.error = files.error or err

        engine._copy_recovery_script = guarded_copy
    return files


def no_space_message(err: OSError) -> str | None:
    """The one line for a full disk (or quota), None for other write errors."""
    reasons = {errno.ENOSPC: "", errno.EDQUOT: " (disk quota exceeded)", errno.EFBIG: " (file size limit)"}
    if err.errno not in reasons:
        return None
    return f"no space left on device{reasons[err.errno]}" + (f" while writing {err.filename}" if err.filename else "")
