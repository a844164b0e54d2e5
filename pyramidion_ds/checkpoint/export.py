"""Consolidate a run dir's ZeRO shards into an export dir, and load an export for inference.

::

    RUN/checkpoints/<tag>/ (ZeRO shards, any stage, any world size)
      └─ consolidate ──> EXPORT/model.safetensors   written tensor by tensor (lazy, memory-mapped shards)
                         EXPORT/config.yaml         the run's resolved config
                         EXPORT/spm.model           the vocabulary
                         EXPORT/export.json         source run + tag + update + checkpoint_sha256,
                                                    spm_identity, spm_sha256, dtype

Consolidation verifies the shards against their checksums (a corrupt newest checkpoint falls back to the
previous complete one) and unpickles them with ``weights_only`` (``safe_load.py``). The export
appears complete or not at all: it is written under ``.EXPORT.tmp-*`` and renamed. Generation on a run
dir consolidates once into ``RUN/export/<tag>`` and reuses it while its ``checkpoint_sha256`` (the sha256
of the checkpoint's manifest, which holds every shard's checksum) is that of the newest complete
checkpoint: a retrain that wrote the same tag again is consolidated anew. Loading reads safetensors (never
unpickles) and checks every tensor name and shape against the model that ``config.yaml`` describes,
naming the first one that disagrees.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import Config, ConfigError, config_from_dict
from ..config.core import read_yaml
from ..config.model import saved_model_dict
from ..errors import UsageError
from .consolidate import consolidated_state_dict
from .manifest import EXPORT_WEIGHTS, CheckpointDir, CheckpointInfo, check_model_dir

log = logging.getLogger(__name__)

EXPORT_META = "export.json"
EXPORT_SUBDIR = "export"
INFERENCE_SECTIONS = ("model", "data", "generation")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPE = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
    torch.uint8: "U8",
}


# --------------------------------------------------------------------------------------------------
# run dir -> export dir
# --------------------------------------------------------------------------------------------------


def is_export_dir(path: Path) -> bool:
    return (path / EXPORT_WEIGHTS).is_file()


def checkpoint_to_export(run_dir: str | os.PathLike, verify: bool = True) -> CheckpointInfo:
    """The newest complete checkpoint of ``run_dir`` (``verify``: whose files match their checksums),
    after checking its shard count; one-line errors."""
    run_dir = Path(run_dir)
    check_model_dir(run_dir)
    info = CheckpointDir(run_dir).latest_complete(warn=log.warning, verify=verify)
    if info is None:
        raise UsageError(
            f"'{run_dir}' holds no complete checkpoint (nothing under {run_dir / 'checkpoints'} "
            f"has a manifest.json whose files are all present)"
        )
    if verify:
        info.check_pickles()
    stage = int(info.manifest.get("zero_stage", 0))
    if stage > 0:
        shards = sorted(info.path.glob("*_optim_states.pt"))
        if len(shards) != info.world_size:
            raise UsageError(
                f"checkpoint '{info.path}' has {len(shards)} optimizer shards but its manifest "
                f"says world size {info.world_size}"
            )
    return info


def consolidate(run_dir: str | os.PathLike, export_dir: str | os.PathLike | None = None, dtype: str = "fp32") -> Path:
    """Write the newest complete checkpoint of ``run_dir`` as an export dir and return its path.

    Default ``export_dir``: ``RUN/export/<tag>``. Tensors are materialized one at a time from DeepSpeed's
    lazy consolidation (the memory-mapped fp32 partitions), so the full model is never held twice.
    """
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
    run_dir = Path(run_dir)
    info = checkpoint_to_export(run_dir)
    out = Path(export_dir) if export_dir else run_dir / EXPORT_SUBDIR / info.tag
    if out.exists() and not is_export_dir(out):
        raise UsageError(f"--export-dir '{out}' exists and is not an export dir; choose another path")
    _run_config(run_dir)  # fail now, in one line, on a config this version cannot read
    spm_path = run_dir / "spm.model"
    from ..data.spm import spm_identity, spm_sha256
    from ..data.tokenizer import copy_tokenizer, tokenizer_meta

    imported = tokenizer_meta(run_dir) is not None  # the tokenizer of a pyramidion-import (data/tokenizer.py)
    if not imported and not spm_path.is_file():
        raise UsageError(f"'{run_dir}' has no spm.model (the run dir is incomplete)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        count = write_safetensors(
            tmp / EXPORT_WEIGHTS, _lazy_state_dict(info), DTYPES[dtype], metadata={"tag": info.tag, "format": "pt"}
        )
        shutil.copyfile(run_dir / "config.yaml", tmp / "config.yaml")  # the resolved config, verbatim
        copy_tokenizer(run_dir, tmp)
        meta = {
            "source_run_dir": str(run_dir.resolve()),
            "tag": info.tag,
            "update": info.update,
            "zero_stage": int(info.manifest.get("zero_stage", 0)),
            "world_size": info.world_size,
            "checkpoint_sha256": info.manifest_sha256,
            "dtype": dtype,
            "tensors": count,
            "spm_identity": spm_identity(run_dir),
            "spm_sha256": spm_sha256(run_dir),
        }
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        if out.exists():  # replace an older export at the same path
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        f"consolidated {info.tag} (update {info.update}, ZeRO-{meta['zero_stage']}, "
        f"{info.world_size} ranks) -> {out} ({count} tensors, {dtype})"
    )
    return out


def export_for(path: str | os.PathLike, dtype: str = "fp32") -> Path:
    """An export dir for ``path``: itself when it is one, else ``RUN/export/<tag>`` of the newest
    complete checkpoint (consolidated now unless an export of that very checkpoint is already there:
    same manifest sha256, not merely the same tag)."""
    path = Path(path)
    if is_export_dir(path):
        return path
    info = checkpoint_to_export(path, verify=False)  # consolidation verifies; a cache hit reads no shard
    cached = path / EXPORT_SUBDIR / info.tag
    if is_export_dir(cached):
        if _export_meta(cached).get("checkpoint_sha256") == info.manifest_sha256:
            return cached
        log.info(
            f"{cached} was consolidated from another checkpoint than the current {info.tag} "
            f"(retrained?); consolidating again"
        )
    return consolidate(path, None, dtype)  # RUN/export/<tag> of the newest checkpoint that verifies


def _lazy_state_dict(info: CheckpointInfo) -> dict:
    """name -> tensor or DeepSpeed GatheredTensor (materialized by ``.contiguous()``)."""
    try:
        return consolidated_state_dict(info, lazy=True)
    except ValueError as err:  # DeepSpeed's own shard checks in its merge (shapes, partitions)
        raise UsageError(f"checkpoint '{info.path}': {str(err).splitlines()[0]}") from None


def write_safetensors(path: Path, tensors: dict, dtype: torch.dtype, metadata: dict | None = None) -> int:
    """Stream ``tensors`` (name -> tensor or lazy tensor) into one safetensors file, one tensor in memory
    at a time. Floating tensors are cast to ``dtype``. Returns the number of tensors written."""
    entries, offset = {}, 0
    for name, tensor in tensors.items():
        out_dtype = dtype if tensor.dtype.is_floating_point else tensor.dtype
        if out_dtype not in _SAFETENSORS_DTYPE:
            raise UsageError(f"tensor '{name}' has dtype {tensor.dtype}, which the export does not support")
        nbytes = int(torch.Size(tensor.shape).numel()) * torch.empty((), dtype=out_dtype).element_size()
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPE[out_dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}, **entries}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _name, tensor in tensors.items():
            data = tensor.contiguous()
            if data.dtype.is_floating_point:
                data = data.to(dtype)
            fh.write(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            del data
    return len(entries)


# --------------------------------------------------------------------------------------------------
# export dir -> model
# --------------------------------------------------------------------------------------------------


def _export_meta(path: Path) -> dict:
    meta_path = path / EXPORT_META
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"'{meta_path}' is not valid JSON") from None


def _run_config(path: Path) -> Config:
    try:
        data = read_yaml(path / "config.yaml")
        # inference needs model, data and generation; the training sections (whose keys change between
        # versions more often) are not read, so an export stays loadable by a newer pyramidion_ds
        sections = {key: data[key] for key in INFERENCE_SECTIONS if key in data}
        if isinstance(sections.get("model"), dict):
            sections["model"] = saved_model_dict(sections["model"])
        return config_from_dict(sections)
    except ConfigError as err:
        raise UsageError(f"'{path / 'config.yaml'}': {err}") from None


def load_export(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, Config, sentencepiece processor) from an export dir. Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..data.spm import load_spm, same_vocabulary, spm_identity, spm_sha256
    from ..data.tokenizer import tokenizer_meta
    from ..model import PyramidionModel

    path = Path(path)
    if not is_export_dir(path):
        raise UsageError(f"'{path}' is not an export dir (no {EXPORT_WEIGHTS})")
    cfg = _run_config(path)
    meta = _export_meta(path)
    spm_path = path / "spm.model"
    if (spm_path.is_file() or tokenizer_meta(path) is not None) and same_vocabulary(
        meta, spm_identity(spm_path), spm_sha256(spm_path)
    ) is False:
        raise UsageError(
            f"'{spm_path}' is not the vocabulary the model was trained with "
            f"(it differs from the one {EXPORT_META} records)"
        )
    try:
        state = load_file(str(path / EXPORT_WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise UsageError(
            f"'{path / EXPORT_WEIGHTS}': not a readable safetensors file ({str(err).splitlines()[0]})"
        ) from None
    try:
        model = PyramidionModel(cfg.model)
    except ValueError as err:
        raise UsageError(f"'{path / 'config.yaml'}': {err}") from None
    state = model.upgrade_state_dict(state)  # an export written before the fused attention projections
    check_weights_match(model, state, path)
    model.load_state_dict(state, strict=False)  # non-persistent buffers (position tables) are not saved
    del state
    return model.to(device=device, dtype=dtype).eval(), cfg, load_spm(spm_path)


def check_weights_match(model: torch.nn.Module, state: dict, where: Path) -> None:
    """One-line error naming the first tensor where ``config.yaml``'s model and the weights disagree."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise UsageError(
                f"export '{where}': config.yaml does not match the weights: tensor '{name}' of "
                f"the configured model is missing from {EXPORT_WEIGHTS}"
            )
        if tuple(state[name].shape) != shape:
            raise UsageError(
                f"export '{where}': config.yaml does not match the weights: tensor '{name}' is "
                f"{tuple(state[name].shape)} in {EXPORT_WEIGHTS}, {shape} in the configured model"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UsageError(
            f"export '{where}': config.yaml does not match the weights: tensor '{extra[0]}' in "
            f"{EXPORT_WEIGHTS} has no place in the configured model ({len(extra)} such)"
        )
