"""Opening a checkpoint never runs code from it.

Every ``.pt`` file is unpickled with ``torch.load(weights_only=True)``, allowing only the plain classes
DeepSpeed's shards hold (:func:`safe_globals`), for our own consolidation (``consolidate.py``) and for
DeepSpeed's ``load_checkpoint`` alike (through the checkpoint engine of ``files.py``).
"""

from __future__ import annotations

import os
import pickle

from ..errors import UsageError


class CheckpointError(UsageError):
    """A checkpoint that cannot be used as it is (a file that would run code, a corrupt shard)."""


def safe_globals() -> list:
    """The only classes a checkpoint ``.pt`` file may reconstruct besides tensors and plain containers:
    DeepSpeed's optimizer-state records (loss scaler, ZeRO stage enum, fragment addresses) and the numpy
    RNG state in our client state. None of them runs code when rebuilt."""
    import importlib

    import numpy as np

    found = [np.ndarray, np.dtype] + [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    for module, name in (("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")):
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        found.append((obj, f"{module}.{name}"))  # pickles of numpy 1 and 2 name it differently
    for module, name in (
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # a DeepSpeed without that class writes no shards holding it
    return found


def safe_torch_load(path: str | os.PathLike, map_location=None, mmap: bool = False, torch_load=None):
    """``torch.load`` that refuses, in one line, a file holding anything but tensors, plain data and
    :func:`safe_globals` (a crafted pickle's ``os.system`` never runs). ``torch_load``: the function to
    call instead of ``torch.load`` (the original, while ``universal.safe_torch_loads`` replaces it)."""
    import torch

    torch_load = torch_load or torch.load
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch_load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next(
            (line for line in lines if "GLOBAL" in line or "allowlisted" in line or "Unsupported" in line),
            lines[-1] if lines else type(err).__name__,
        )
        raise CheckpointError(
            f"refusing to load '{path}': it holds more than tensors and plain data, and "
            f"unpickling it could run code ({detail[:200]})"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"'{path}' is not a readable checkpoint file "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None
