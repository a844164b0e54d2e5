"""DeepSpeed JSON: read it, merge it with the trainer config, and refuse contradictions early.

The JSON files in ``ds_configs/`` own what is DeepSpeed's business (ZeRO stage, offload, buckets,
loss-scale settings); the trainer config owns batch shape, precision and clipping. A DeepSpeed value of
``"auto"`` follows the trainer; an explicit value must agree with it, or loading fails with one line
naming the JSON key and the trainer key. Optimizer and scheduler blocks are refused: the trainer builds
both (``train.*``), so there is one place to set them.

``train.deepspeed_config`` is a path or the name of a shipped JSON (:func:`ds_config_path`): the repo's
top-level ``ds_configs/`` is installed as the data-only package ``pyramidion_ds.ds_configs`` (setup.py maps
it), so ``zero3_bf16`` resolves from any directory, in an editable or a regular install.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path

from ..config import Config, ConfigError

#: ZeRO options that only mean something at stage 3
STAGE3_ONLY = (
    "offload_param",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
    "zero_hpz_partition_size",
    "zero_quantized_weights",
    "mics_shard_size",
)
KNOWN_TOP_LEVEL = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "zero_optimization",
    "steps_per_print",
    "wall_clock_breakdown",
    "activation_checkpointing",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "flops_profiler",
    "comms_logger",
    "memory_breakdown",
    "dump_state",
    "checkpoint",
    "aio",
    "data_types",
    "seq_parallel_communication_data_type",
    "torch_autocast",
    "compile",
    "timers",
    "monitor_config",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "optimizer",
    "scheduler",
    "amp",
    "elasticity",
}


#: where the shipped DeepSpeed JSONs are installed (setup.py maps the top-level ds_configs/ onto it)
SHIPPED_PACKAGE = "pyramidion_ds.ds_configs"


def shipped_ds_configs() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped DeepSpeed JSON.

    Read through ``importlib.resources`` from the installed package ``pyramidion_ds.ds_configs`` (a regular
    install copies the JSONs into it; an editable one maps it onto the checkout's ``ds_configs/``); a source
    checkout used without installing it (``PYTHONPATH=.``) has no such package and reads its own folder."""
    try:
        root = importlib.resources.files(SHIPPED_PACKAGE)
        found = [Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".json")]
    except ModuleNotFoundError:
        found = list((Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json"))
    return {path.stem: path for path in sorted(found, key=lambda path: path.stem)}


def ds_config_path(name_or_path: str | Path) -> Path:
    """The DeepSpeed JSON that ``train.deepspeed_config`` names: an existing file (absolute, or relative to
    the working directory) wins; else a bare name, with or without ``.json``, names a shipped config."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_ds_configs()
    name = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    if str(name_or_path) in (name, f"{name}.json") and name in shipped:
        return shipped[name]
    raise ConfigError(
        f"train.deepspeed_config: '{name_or_path}' does not exist and is not a shipped DeepSpeed "
        f"config name ({', '.join(shipped) or 'none found'})"
    )


def read_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON file, given by path or shipped name (:func:`ds_config_path`), with one-line
    errors for a missing file or malformed JSON."""
    path = ds_config_path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"train.deepspeed_config: '{path}' is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"train.deepspeed_config: '{path}' is not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config: '{path}' must hold a JSON object")
    return data


def _enabled(block) -> object:
    return block.get("enabled", False) if isinstance(block, dict) else False


def resolve_ds_config(raw: dict, cfg: Config, world_size: int, source: str = "deepspeed config") -> dict:
    """Return a copy of ``raw`` with every ``"auto"`` filled from ``cfg`` and every contradiction refused.

    Also returns the resolved precision in ``cfg.train.precision`` terms via the ``bf16``/``fp16``
    blocks (exactly one of them enabled, or neither for fp32).
    """
    ds = copy.deepcopy(raw)
    where = f"{source}:"
    unknown = sorted(set(ds) - KNOWN_TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{where} unknown key '{unknown[0]}'")
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ConfigError(
                f"{where} '{block}' block is not used: the trainer builds it from train.* "
                f"(train.lr, train.lr_scheduler, ...); remove it from the JSON"
            )

    # ---- precision -------------------------------------------------------------------------------
    bf16, fp16 = ds.setdefault("bf16", {}), ds.setdefault("fp16", {})
    for name, block in (("bf16", bf16), ("fp16", fp16)):
        if not isinstance(block, dict):
            raise ConfigError(f"{where} '{name}' must be an object like {{\"enabled\": true}}")
    wanted = cfg.train.precision
    json_choice = [name for name, block in (("bf16", bf16), ("fp16", fp16)) if _enabled(block) is True]
    if len(json_choice) == 2:
        raise ConfigError(f"{where} bf16.enabled and fp16.enabled are both true; enable at most one")
    if wanted == "auto":
        wanted = json_choice[0] if json_choice else "fp32"
    elif json_choice and json_choice[0] != wanted:
        raise ConfigError(f"{where} {json_choice[0]}.enabled=true contradicts train.precision={wanted}")
    bf16["enabled"], fp16["enabled"] = wanted == "bf16", wanted == "fp16"
    for name, block in (("bf16", bf16), ("fp16", fp16)):
        if not block["enabled"]:  # keep only the switch for the unused format
            ds[name] = {"enabled": False}

    # ---- batch shape -----------------------------------------------------------------------------
    micro = cfg.data.max_sentences or 1  # token-budget batches vary in size; DeepSpeed needs a number
    gas = cfg.train.update_freq
    _agree(ds, "train_micro_batch_size_per_gpu", micro, "data.max_sentences", where)
    _agree(ds, "gradient_accumulation_steps", gas, "train.update_freq", where)
    _agree(
        ds,
        "train_batch_size",
        micro * gas * world_size,
        f"data.max_sentences x train.update_freq x world size ({micro} x {gas} x {world_size})",
        where,
    )
    _agree(ds, "gradient_clipping", float(cfg.train.clip_norm), "train.clip_norm", where)

    # ---- ZeRO ------------------------------------------------------------------------------------
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where} zero_optimization must be an object")
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where} zero_optimization.stage: got {stage!r}, expected 0, 1, 2 or 3")
    if stage < 3:
        misplaced = [key for key in STAGE3_ONLY if key in zero]
        if misplaced:
            raise ConfigError(
                f"{where} zero_optimization.{misplaced[0]} is a stage-3 option but zero_optimization.stage is {stage}"
            )
    if "offload_optimizer" in zero and stage < 1:
        raise ConfigError(f"{where} zero_optimization.offload_optimizer needs stage >= 1 (got {stage})")
    return ds


def _agree(ds: dict, key: str, value, trainer_key: str, where: str) -> None:
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(
            f"{where} {key}={current!r} contradicts {trainer_key}={value!r}; "
            f'set it to "auto" to follow the trainer, or change the trainer value'
        )


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    block = ds.get("zero_optimization", {}).get("offload_optimizer")
    return isinstance(block, dict) and block.get("device", "none") not in ("none", None)


def precision_of(ds: dict) -> str:
    if _enabled(ds.get("bf16")) is True:
        return "bf16"
    if _enabled(ds.get("fp16")) is True:
        return "fp16"
    return "fp32"


def validate_ds_config(ds: dict, source: str = "deepspeed config") -> None:
    """Run DeepSpeed's own parser (its pydantic models) on a resolved config, so a typo inside a block
    (``zero_optimization.overlap_com``) fails before anything is written, in one line naming the key.

    ``train_batch_size`` is left out: DeepSpeed would check it against the world size it sees, which in
    a check before the launch is not the run's; :func:`resolve_ds_config` has checked it already."""
    import difflib

    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import BaseModel, ValidationError

    check = {key: value for key, value in ds.items() if key != "train_batch_size"}
    try:
        DeepSpeedConfig(check)
    except ValidationError as err:
        first = err.errors()[0]
        block = _MODEL_BLOCKS.get(err.title, "")
        loc = ".".join(str(part) for part in first.get("loc", ()))
        key = ".".join(part for part in (block, loc) if part)
        if first.get("type") == "extra_forbidden":
            model = _model_class(err.title)
            names = sorted(_field_names(model)) if model is not None and issubclass(model, BaseModel) else []
            close = difflib.get_close_matches(str(first["loc"][-1]), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}") from None
        raise ConfigError(f"{source}: {key}: {first.get('msg', 'invalid')} (got {first.get('input')!r})") from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:  # DeepSpeed's own checks outside pydantic
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{source}: DeepSpeed refuses it: {message}") from None


#: DeepSpeed's pydantic model names -> the JSON block they parse
_MODEL_BLOCKS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedFP16Config": "fp16",
    "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
    "DeepSpeedFlopsProfilerConfig": "flops_profiler",
    "CommsConfig": "comms_logger",
}


def _model_class(title: str):
    import importlib

    for module in (
        "deepspeed.runtime.zero.config",
        "deepspeed.runtime.zero.offload_config",
        "deepspeed.runtime.precision_config",
        "deepspeed.runtime.activation_checkpointing.config",
        "deepspeed.profiling.config",
        "deepspeed.comm.config",
    ):
        try:
            found = getattr(importlib.import_module(module), title, None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


def _field_names(model) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names
