"""One typed configuration tree for every command.

    Config
    ├── model        ModelConfig        size preset, variant, widths, pooling schedule
    ├── data         DataConfig         shards, batching, denoising
    ├── train        TrainConfig        optimisation, checkpoints, logging
    ├── generation   GenerationConfig   beam search (fairseq-generate names)
    └── distributed  DistributedConfig  backend, timeouts

Load with :func:`load_config` (a YAML path or the name of a shipped config, then dotted overrides such
as ``--model.chunk_size 256``); every problem is a one-line :class:`ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .core import ConfigError, build, field_help, option, parse_overrides, read_yaml, set_dotted, to_dict, write_yaml
from .data import DataConfig, DenoisingConfig
from .distributed import DistributedConfig
from .generate import GenerationConfig
from .model import MODEL_PRESETS, VARIANTS, ModelConfig, default_schedule, parse_pooling_schedule
from .train import TrainConfig

#: Run configs shipped with the package, loadable by name (e.g. ``pyramidion-train debug``).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"

RESOLVED_CONFIG_NAME = "config.yaml"


@dataclass
class Config:
    model: ModelConfig = option(ModelConfig(), "model architecture")
    data: DataConfig = option(DataConfig(), "data and batching")
    train: TrainConfig = option(TrainConfig(), "training")
    generation: GenerationConfig = option(GenerationConfig(), "generation")
    distributed: DistributedConfig = option(DistributedConfig(), "distributed runtime")

    # Values derived from several sections, resolved here once. They are not fields: the saved config.yaml
    # keeps what the user set (0 = "the default"), so a run keeps following the model's chunk size or
    # train.compile when those change on resume or fine-tuning.

    @property
    def source_pad_multiple(self) -> int:
        """Source widths are padded to a multiple of this: data.pad_to_multiple, 0 = model.chunk_size."""
        return self.data.pad_to_multiple or self.model.chunk_size

    def validate(self) -> None:
        multiple, longest = self.source_pad_multiple, self.model.max_source_positions
        if multiple and longest % multiple:  # a source of `longest` tokens would be padded past the model's length
            key = "data.pad_to_multiple" if self.data.pad_to_multiple else "model.chunk_size"
            padded = -(-longest // multiple) * multiple
            raise ConfigError(
                f"{key}: got {multiple}, expected a divisor of model.max_source_positions ({longest}): sources are "
                f"padded to a multiple of it, so one of {longest} tokens would become {padded}"
            )

    @property
    def batch_size_multiple(self) -> int:
        """Batch sizes are a multiple of this (below it a power of two): data.required_batch_size_multiple,
        0 = 8 under train.compile (a bounded number of recompiles), else 1 (any size)."""
        return self.data.required_batch_size_multiple or (8 if self.train.compile else 1)

    @property
    def target_pad_multiple(self) -> int:
        """Target widths are padded to a multiple of this: data.target_pad_to_multiple, 0 = 64 under
        train.compile, else 1 (the longest target)."""
        return self.data.target_pad_to_multiple or (64 if self.train.compile else 1)


def shipped_configs() -> dict[str, Path]:
    """Name -> path of every run config shipped in ``pyramidion_ds/configs``."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a shipped config ({', '.join(shipped) or 'none'})"
    )


def load_config(
    name_or_path: str | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> Config:
    """Build a validated :class:`Config` from a YAML file (or shipped name) plus dotted overrides."""
    data = dict(base or {})
    if name_or_path:
        data = _merge(data, read_yaml(resolve_config_path(name_or_path)))
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    return build(Config, data)


def config_from_dict(data: dict) -> Config:
    return build(Config, data)


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write the fully resolved config into ``run_dir`` (atomically) and return its path."""
    path = Path(run_dir) / RESOLVED_CONFIG_NAME
    write_yaml(to_dict(cfg), path)
    return path


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DenoisingConfig",
    "DistributedConfig",
    "GenerationConfig",
    "MODEL_PRESETS",
    "ModelConfig",
    "TrainConfig",
    "VARIANTS",
    "build",
    "config_from_dict",
    "default_schedule",
    "field_help",
    "load_config",
    "parse_overrides",
    "parse_pooling_schedule",
    "resolve_config_path",
    "save_resolved",
    "shipped_configs",
    "to_dict",
]
