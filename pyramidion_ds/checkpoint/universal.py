"""DeepSpeed's universal checkpoint: a ZeRO checkpoint resumed on another world size or ZeRO stage.

A ZeRO-1/2/3 checkpoint holds each rank's flat partition of the fp32 weights and Adam's moments, so only
the same layout loads it. DeepSpeed's ``ds_to_universal`` rewrites the partitions per parameter
(``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``), which any layout loads with the engine's
``load_universal`` switch. The conversion goes next to the checkpoint it came from::

    checkpoints/update_0000100/             the checkpoint (its manifest.json lists its own files)
                └── universal/              the conversion: model states + zero/<param>/*.pt
                    └── manifest.json       size + sha256 of every file, and the source manifest's sha256

It is written under ``.universal.tmp`` and renamed when complete, reused when its manifest matches (sizes,
and checksums when verified), pruned with its checkpoint. DeepSpeed's conversion and its universal loader
unpickle with ``torch.load`` unrestricted; here every such call is made with ``weights_only=True`` and the
allow-list of ``safe_load.py`` (:func:`safe_torch_loads`), so neither runs code from a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .manifest import MANIFEST, CheckpointInfo, file_sha256, write_text_atomic
from .safe_load import CheckpointError, safe_torch_load

UNIVERSAL = "universal"
#: DeepSpeed names the client-state file by the stage that wrote it; a universal tag holds both names so
#: a run of any stage finds it (ZeRO-1/2: mp_rank_00_..., ZeRO-3: zero_pp_rank_0_mp_rank_00_...)
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def layout_change(info: CheckpointInfo, world_size: int, zero_stage: int) -> str | None:
    """How the checkpoint's layout differs from a run of ``world_size`` ranks under ``zero_stage`` (None:
    the same; DeepSpeed's own load takes it)."""
    changes = []
    if info.world_size != world_size:
        changes.append(f"{info.world_size} ranks -> {world_size}")
    if info.zero_stage != zero_stage:
        changes.append(f"ZeRO-{info.zero_stage} -> ZeRO-{zero_stage}")
    return ", ".join(changes) or None


def conversion_problem(info: CheckpointInfo, zero_stage: int) -> str | None:
    """Why a checkpoint cannot be resumed through the universal format by a run of ``zero_stage``."""
    if info.zero_stage == 0 or zero_stage == 0:
        return (
            f"checkpoint '{info.path}' (ZeRO-{info.zero_stage}) cannot continue under ZeRO-{zero_stage} on "
            f"another layout: DeepSpeed's universal checkpoint needs ZeRO stage 1, 2 or 3 on both sides; "
            f"resume with its own ds_config and world size, or start from its weights with --train.init_from"
        )
    return None


def universal_dir(info: CheckpointInfo) -> Path:
    return info.path / UNIVERSAL


def ready(info: CheckpointInfo, verify: bool = True) -> bool:
    """True when the checkpoint's universal conversion is on disk, complete and made from this checkpoint
    (sizes always, sha256 when ``verify``)."""
    path = universal_dir(info)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("source_manifest_sha256") != info.manifest_sha256:
            return False
        for name, entry in manifest["files"].items():
            file = path / name
            if Path(name).is_absolute() or ".." in Path(name).parts or file.is_symlink():
                return False
            if not file.is_file() or file.stat().st_size != entry["size"]:
                return False
            if verify and file_sha256(file) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


@contextlib.contextmanager
def safe_torch_loads():
    """Every ``torch.load`` in this block (DeepSpeed's conversion and universal loader, their worker
    processes forked from here) unpickles with ``weights_only=True`` and our allow-list."""
    import torch

    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        location = map_location if map_location is not None else "cpu"
        return safe_torch_load(f, map_location=location, torch_load=original)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert(info: CheckpointInfo, workers: int | None = None) -> Path:
    """Write the universal conversion of ``info`` (a verified ZeRO checkpoint) next to it; returns its dir.

    Run on one process (rank 0); DeepSpeed spreads the extraction and the merge over ``workers`` processes
    (default: half the CPUs, at most 8)."""
    from deepspeed.checkpoint import ds_to_universal

    info.check_pickles()
    final = universal_dir(info)
    tmp = info.path / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    out = tmp / UNIVERSAL
    workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    args = _Args(input_folder=str(info.path), output_folder=str(out), workers=workers)
    with (
        safe_torch_loads(),
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        try:
            ds_to_universal.main(args)
        except (AssertionError, FileNotFoundError, KeyError, RuntimeError, NotImplementedError, ValueError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"cannot convert checkpoint '{info.path}' to DeepSpeed's universal format: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
    _fit_every_stage(out / "zero")
    present = [name for name in MODEL_STATES if (out / name).is_file()]
    if not present:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint '{info.path}' has no model states file ({' or '.join(MODEL_STATES)})")
    for name in MODEL_STATES:
        if not (out / name).is_file():
            _link_or_copy(out / present[0], out / name)
    files = {}
    for file in sorted(out.rglob("*")):
        if file.is_file():
            files[str(file.relative_to(out))] = {"size": file.stat().st_size, "sha256": file_sha256(file)}
    manifest = {"source_tag": info.tag, "source_manifest_sha256": info.manifest_sha256, "files": files}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    os.replace(out, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fit_every_stage(zero: Path) -> None:
    """DeepSpeed writes the shared optimizer state (``zero/optimizer_state.pt``) in the layout of the stage
    that saved, and its ZeRO-3 loader reads it in another than its ZeRO-1/2 loader (which also wants a
    ``step.pt`` per parameter): hold both, so any stage loads the conversion. Nothing is resharded."""
    import deepspeed
    import torch

    path = zero / "optimizer_state.pt"
    state = safe_torch_load(path, map_location="cpu")
    param_dirs = sorted(p.parent for p in zero.rglob("fp32.pt"))
    if "optimizer_state_dict" in state:  # written by ZeRO-3: the step is shared, no step.pt
        step = state["optimizer_state_dict"]["state"][0]["step"]
        for folder in param_dirs:
            if not (folder / "step.pt").is_file():
                torch.save(step, folder / "step.pt")
    else:  # written by ZeRO-1/2: one step.pt per parameter, the same everywhere
        steps = [folder / "step.pt" for folder in param_dirs if (folder / "step.pt").is_file()]
        step = safe_torch_load(steps[0], map_location="cpu") if steps else torch.tensor(0.0)
        state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    state.setdefault("ds_version", deepspeed.__version__)
    torch.save(state, path)


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_states(info: CheckpointInfo, name: str) -> dict:
    """``param name -> tensor`` of one per-parameter state of the conversion (``fp32``, ``exp_avg``,
    ``exp_avg_sq``): the consolidated optimizer state."""
    zero = universal_dir(info) / "zero"
    states = {}
    for path in sorted(zero.rglob(f"{name}.pt")):
        value = safe_torch_load(path, map_location="cpu")
        states[str(path.parent.relative_to(zero))] = value["param"] if isinstance(value, dict) else value
    return states


def repair_zero3_load(optimizer, info: CheckpointInfo) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader, on ZeRO-3's inner torch ``optimizer``.

    It gives every parameter group the same ``step`` tensor, which Adam then increments in place once per
    group and update (two groups: the bias correction runs twice as fast); each group gets its own copy.
    And it copies the *first* saved group's settings into every group, so the no-decay group (biases,
    norms) would continue with weight decay; each group gets its saved settings back, paired by index as
    the ZeRO-1/2 loader does."""
    import torch

    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = safe_torch_load(universal_dir(info) / "zero" / "optimizer_state.pt", map_location="cpu")["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint '{info.path}' has {len(saved)} optimizer parameter groups, this model "
            f"{len(optimizer.param_groups)}"
        )
    for group, saved_group in zip(optimizer.param_groups, saved, strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


class _Args:
    """The argparse namespace ``ds_to_universal.main`` reads."""

    def __init__(self, input_folder: str, output_folder: str, workers: int):
        self.input_folder, self.output_folder = input_folder, output_folder
        self.num_extract_workers = workers
        self.num_merge_workers = max(1, workers // 2)
        self.keep_temp_folder = False
        self.strict = True
        self.inject_missing_state = True  # our client state has no universal_checkpoint_info (no TP/PP)


def _link_or_copy(source: Path, dest: Path) -> None:
    """The same file under a second name: a hard link (no second copy on disk) where the filesystem allows."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
