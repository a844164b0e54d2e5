"""DeepSpeed, applied to the plain-PyTorch model from outside: config merge, ZeRO, checkpointing."""

from .ds_config import (
    ds_config_path,
    offloads_optimizer,
    precision_of,
    read_ds_config,
    resolve_ds_config,
    shipped_ds_configs,
    validate_ds_config,
    zero_stage,
)
from .optim import label_smoothed_nll_loss, lr_lambda, make_optimizer, make_scheduler, param_groups
from .setup import Engine, build_engine, build_model, configure_activation_checkpointing, load_full_state_dict

__all__ = [
    "Engine",
    "build_engine",
    "build_model",
    "configure_activation_checkpointing",
    "ds_config_path",
    "label_smoothed_nll_loss",
    "load_full_state_dict",
    "lr_lambda",
    "make_optimizer",
    "make_scheduler",
    "offloads_optimizer",
    "param_groups",
    "precision_of",
    "read_ds_config",
    "resolve_ds_config",
    "shipped_ds_configs",
    "validate_ds_config",
    "zero_stage",
]
