"""DeepSpeed applied from outside the model: construction under ZeRO-3, checkpointing, optimizer.

The model (``pyramidion_ds.model``) imports torch only. Here it is built under ``deepspeed.zero.Init``
when the JSON asks for stage 3 (parameters are partitioned as they are created, so a model larger than
one device never exists whole), handed DeepSpeed's activation-checkpoint function (applied per pyramid
stage or per layer), and wrapped by ``deepspeed.initialize`` with our optimizer and schedule.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config
from .ds_config import offloads_optimizer, precision_of, zero_stage
from .optim import make_optimizer, make_scheduler


@dataclass
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine
    model: torch.nn.Module  # the plain module inside the engine
    optimizer_name: str
    zero_stage: int
    precision: str
    ds_config: dict


def build_model(cfg: Config, ds_config: dict | None = None) -> torch.nn.Module:
    """Construct the model, partitioned at creation under ZeRO-3."""
    from ..model import PyramidionModel

    context = contextlib.nullcontext()
    if ds_config is not None and zero_stage(ds_config) == 3:
        import deepspeed

        context = deepspeed.zero.Init(config_dict_or_path=ds_config)
    with context:
        return PyramidionModel(cfg.model)


def configure_activation_checkpointing(model: torch.nn.Module, granularity: str, ds_config: dict) -> None:
    """Hand DeepSpeed's checkpoint function to the model (``off``, per ``stage``, or per ``layer``).

    The JSON's ``activation_checkpointing`` block (partition_activations, cpu_checkpointing, ...) is
    passed through to DeepSpeed unchanged.
    """
    if granularity == "off":
        model.set_activation_checkpointing(None, "off")
        return
    import deepspeed

    deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
    model.set_activation_checkpointing(deepspeed.checkpointing.checkpoint, granularity)


def build_engine(cfg: Config, ds_config: dict, model: torch.nn.Module | None = None) -> Engine:
    import deepspeed

    model = build_model(cfg, ds_config) if model is None else model
    configure_activation_checkpointing(model, cfg.train.activation_checkpointing, ds_config)
    optimizer, optimizer_name = make_optimizer(model, cfg.train, offload=offloads_optimizer(ds_config))
    scheduler = make_scheduler(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if cfg.train.compile:
        compile_engine(engine, cfg)
    return Engine(
        engine=engine,
        model=engine.module,
        optimizer_name=optimizer_name,
        zero_stage=zero_stage(ds_config),
        precision=precision_of(ds_config),
        ds_config=ds_config,
    )


def recompile_limit(cfg: Config) -> int:
    """How many graphs one compiled forward may need: every bucketed batch shape (see
    :func:`pyramidion_ds.data.batching.shape_bound`), in training and in evaluation mode, plus slack for
    the few batches that evening out across ranks splits."""
    from ..data.batching import shape_bound

    m = cfg.model
    shapes = shape_bound(
        cfg.data.max_tokens,
        cfg.data.max_sentences,
        m.max_source_positions,
        cfg.source_pad_multiple,
        cfg.batch_size_multiple,
        m.max_target_positions,
        cfg.target_pad_multiple,
    )
    return 2 * shapes + 8


def compile_engine(engine, cfg: Config) -> None:
    """``engine.compile`` with static shapes (one graph per bucketed shape, no dynamic-shape guards that
    the top-k's Python loop over widths would break) and ``train.compile_mode``; raises Dynamo's
    recompile limit to what the shape buckets need (its default, 8, would silently fall back to eager)."""
    import torch._dynamo

    limit = recompile_limit(cfg)
    for name in ("recompile_limit", "cache_size_limit"):  # torch >= 2.6 / older name
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    kwargs = {"dynamic": False}
    if cfg.train.compile_mode != "default":
        kwargs["mode"] = cfg.train.compile_mode
    engine.compile(compile_kwargs=kwargs)


def load_full_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, zero3: bool) -> None:
    """Copy a full (consolidated) state dict into ``model``, gathering ZeRO-3 partitions as needed.

    A state dict of an older parameter layout is upgraded first (``model.upgrade_state_dict``: separate
    q/k/v attention projections become the fused ones). Raises ``ValueError`` naming the first
    missing/unexpected/mis-shaped tensor.
    """
    upgrade = getattr(model, "upgrade_state_dict", None)
    if upgrade is not None:
        state_dict = upgrade(state_dict)
    params = dict(model.named_parameters())
    buffers = {name: buf for name, buf in model.named_buffers() if name in state_dict}
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params) - set(buffers))
    if missing:
        raise ValueError(f"checkpoint lacks parameter '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        raise ValueError(
            f"checkpoint has parameter '{unexpected[0]}' this model does not ({len(unexpected)} unexpected)"
        )
    for name, param in params.items():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(
                f"parameter '{name}' has shape {tuple(state_dict[name].shape)} in the checkpoint, {shape} in this model"
            )
    if zero3:
        import deepspeed
        import torch.distributed as dist

        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dist.get_rank() == 0:
                    param.data.copy_(state_dict[name].to(param.dtype))
    else:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state_dict[name].to(param.dtype))
    with torch.no_grad():
        for name, buf in buffers.items():
            buf.copy_(state_dict[name].to(buf.dtype))
