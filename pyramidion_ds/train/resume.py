"""Resume: find the checkpoint a run continues, verify it, load it; and the weights of ``--init-from``.

client_state     what a checkpoint records beside DeepSpeed's state (update, epoch, data position, RNGs)
check_resume     the newest complete, verified checkpoint of the run dir, and the update_freq that keeps
                 its global batch on this world size (both run by the pre-flight checks)
check_layout     same layout (DeepSpeed's own load) or another world size / ZeRO stage (universal)
describe         one line: what the resume will do (--check-only prints it, train.log records it)
prepare          rank 0 converts a checkpoint of another layout, before the run dir is written to
resume           load it into the built engine: as it is, or DeepSpeed's universal conversion
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import universal
from ..checkpoint.manifest import stale_layout_problem
from ..checkpoint.safe_load import CheckpointError, safe_torch_load
from ..config import to_dict
from ..engine import load_full_state_dict, zero_stage
from ..errors import UsageError
from .state import rng_state, set_rng_state

log = logging.getLogger(__name__)


def client_state(trainer) -> dict:
    rngs = [None] * trainer.world_size
    dist.all_gather_object(rngs, rng_state())
    # the loader prefetches ahead of training: record the batches actually trained on
    sampler = trainer.train_sampler.state_dict(position=trainer.epoch_position)
    return {
        "update": trainer.update,
        "epoch": trainer.epoch,
        "sampler": sampler,
        "rng": rngs,
        "best": dict(trainer.best),
        "bad_validations": trainer.bad_validations,
        "valid_history": trainer.valid_history,
        "config": to_dict(trainer.cfg),
        "spm_sha256": trainer.spm_hash,
        "spm_identity": trainer.spm_id,
        "world_size": trainer.world_size,
    }


def verify_on_ranks(trainer, info) -> str | None:
    """Compare the files of a checkpoint (``CheckpointInfo``) with their checksums, each rank hashing
    a share of them; every rank gets the first problem found (or None)."""
    names = sorted(info.manifest["files"])
    if not (dist.is_initialized() and trainer.world_size > 1):
        return info.checksum_problem(names)
    problems = [None] * trainer.world_size
    dist.all_gather_object(problems, info.checksum_problem(names[trainer.rank :: trainer.world_size]))
    return next((problem for problem in problems if problem), None)


def check_resume(trainer):
    """The checkpoint a resume continues (complete and verified, newest first), refused when it was
    trained with another vocabulary; None to start from scratch. A run on another world size takes the
    ``train.update_freq`` that keeps the checkpoint's global batch (:func:`keep_global_batch`)."""
    from ..data import same_vocabulary

    info = trainer.ckpt.latest_complete(warn=trainer.notes.append, verify=trainer.verify)
    if info is None:
        if trainer.ckpt.tags():
            trainer.notes.append(f"no complete checkpoint in {trainer.ckpt.root}; starting from scratch")
        return None
    if same_vocabulary(info.manifest, trainer.spm_id, trainer.spm_hash, trainer.run_dir / "spm.model") is False:
        raise UsageError(
            f"checkpoint {info.path} was trained with another sentencepiece vocabulary than "
            f"{Path(trainer.cfg.data.data) / 'spm.model'}; pass --no-resume to train from scratch "
            f"in this save_dir (its checkpoints get replaced), or choose another train.save_dir"
        )
    info.check_pickles()
    problem = stale_layout_problem(info.path)  # optimizer state in another parameter order
    if problem:
        raise UsageError(problem)
    keep_global_batch(trainer, info)
    return info


def saved_micro_batches(trainer, info) -> int:
    """Micro-batches per update over all ranks of the run that wrote ``info`` (its global batch)."""
    if info.manifest.get("micro_batches_per_update"):
        return int(info.manifest["micro_batches_per_update"])
    # written before the manifest recorded it: the client state's config (memory-mapped, names only read)
    states = next((info.path / name for name in universal.MODEL_STATES if (info.path / name).is_file()), None)
    saved = safe_torch_load(states, map_location="cpu", mmap=True) if states else {}
    update_freq = ((saved.get("config") or {}).get("train") or {}).get("update_freq", 1)
    return int(update_freq) * info.world_size


def keep_global_batch(trainer, info) -> None:
    """Set ``train.update_freq`` so that world size x update_freq is the checkpoint's: the same global
    batch, and the data position (counted in global batches) continues. Refused in one line naming the
    world sizes that work when this world size does not divide it."""
    total = saved_micro_batches(trainer, info)
    world, cfg = trainer.world_size, trainer.cfg.train
    if world * cfg.update_freq == total:
        return
    if total % world:
        works = [n for n in range(1, total + 1) if total % n == 0]
        raise UsageError(
            f"checkpoint {info.path} was trained with {total} micro-batches per update "
            f"({info.world_size} ranks x update_freq {total // info.world_size}); {world} ranks cannot keep "
            f"that global batch (update_freq would be {total / world:.3g}): resume on "
            f"{', '.join(map(str, works))} ranks, or pass --no-resume with another train.save_dir"
        )
    if trainer.rank == 0:
        trainer.notes.append(
            f"train.update_freq {cfg.update_freq} -> {total // world}: {world} ranks x {total // world} keep "
            f"the checkpoint's global batch of {total} micro-batches per update"
        )
    cfg.update_freq = total // world


def check_layout(trainer) -> None:
    """Whether the checkpoint loads as it is or through DeepSpeed's universal format (run by the checks
    once the DeepSpeed config is known); refused in one line when neither works."""
    info = trainer.resume_from
    if info is None:
        return
    stage = zero_stage(trainer.ds_config)
    trainer.layout_change = universal.layout_change(info, trainer.world_size, stage)
    if trainer.layout_change:
        problem = universal.conversion_problem(info, stage)
        if problem:
            raise UsageError(problem)


def describe(trainer) -> str:
    """One line: what a resume of this run will do (``--check-only`` prints it, train.log records it)."""
    info = trainer.resume_from
    if not trainer.cfg.train.resume:
        return "resume: off (--no-resume): training starts from scratch"
    if info is None:
        return f"resume: no complete checkpoint in {trainer.ckpt.root}: training starts from scratch"
    batch = f"{trainer.world_size} ranks x update_freq {trainer.cfg.train.update_freq}"
    where = f"resume: {info.tag} (update {info.update}, {info.world_size} ranks, ZeRO-{info.zero_stage})"
    if not trainer.layout_change:
        return f"{where} on the same layout; global batch {batch}"
    how = (
        f"reusing its universal conversion {universal.universal_dir(info)}"
        if universal.ready(info, verify=False)
        else f"converting it to DeepSpeed's universal checkpoint in {universal.universal_dir(info)}"
    )
    return (
        f"{where} on another layout ({trainer.layout_change}): {how}; weights, optimizer moments, LR schedule "
        f"and data position continue; global batch {batch}"
    )


def resume(trainer) -> bool:
    info = trainer.resume_from  # found and verified by check()
    if info is None:
        return False
    if trainer.layout_change:
        _, client = _load_universal(trainer, info)
    else:
        _, client = trainer.engine.load_checkpoint(str(trainer.ckpt.root), tag=info.tag)
    if client is None:
        raise UsageError(f"checkpoint {info.path} could not be loaded")
    trainer.update, trainer.epoch = client["update"], client["epoch"]
    trainer.train_sampler.load_state_dict(client["sampler"], world_size=client.get("world_size"))
    trainer.best, trainer.bad_validations = client["best"], client["bad_validations"]
    trainer.valid_history = client.get("valid_history", [])
    rngs = client["rng"]
    set_rng_state(rngs[trainer.rank % len(rngs)])  # another world size: the saved streams, reused in turn
    log.info(
        f"resumed from {info.path} at update {trainer.update} (epoch {trainer.epoch}, sampler "
        f"{trainer.train_sampler.state_dict()})"
    )
    return True


def prepare(trainer) -> None:
    """Before the run dir is written to: rank 0 converts a checkpoint of another layout to DeepSpeed's
    universal format (or reuses a verified conversion); a failed conversion is refused on every rank in one
    line, with the run dir's config.yaml, ds_config.json and spm.model untouched."""
    info = trainer.resume_from
    if info is None or not trainer.layout_change:
        return
    target = universal.universal_dir(info)
    error = [None]
    if trainer.rank == 0:
        try:
            if universal.ready(info, verify=True):
                log.info(f"resume on another layout ({trainer.layout_change}): reusing {target}")
            else:
                started = time.perf_counter()
                universal.convert(info)
                log.info(
                    f"resume on another layout ({trainer.layout_change}): converted {info.path} to DeepSpeed's "
                    f"universal checkpoint in {time.perf_counter() - started:.1f} s "
                    f"({universal.size_bytes(target) / 2**20:.1f} MiB in {target})"
                )
        except (CheckpointError, OSError) as err:
            error = [str(err)]
    if dist.is_initialized() and trainer.world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise UsageError(error[0])


def _load_universal(trainer, info):
    """Every rank loads the conversion through DeepSpeed's universal loader: weights, Adam moments and
    step, LR schedule, loss scale."""
    engine = trainer.engine
    engine._config.load_universal_checkpoint = True
    try:
        with universal.safe_torch_loads():
            loaded = engine.load_checkpoint(str(info.path), tag=universal.UNIVERSAL)
    finally:
        engine._config.load_universal_checkpoint = False
    if trainer.bundle.zero_stage == 3:  # the torch optimizer inside ZeRO-3's
        universal.repair_zero3_load(engine.optimizer.optimizer, info)
    return loaded


def load_weights(trainer, state: dict) -> None:
    """Full weights into the engine's model (init-from, resume on another world size).

    ZeRO 1-3 and the bf16/fp16 optimizers step an fp32 master copy of the weights, taken from the module
    at deepspeed.initialize, and copy it back after each step: without the refresh the first update
    would put the random initialisation back (the loaded weights lasted until update 1)."""
    load_full_state_dict(trainer.model, state, zero3=trainer.bundle.zero_stage == 3)
    refresh = getattr(trainer.engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def init_from(trainer) -> None:
    """Weights only (pretrain -> fine-tune): from a run dir (ZeRO shards) or an export dir."""
    load_weights(trainer, trainer.init_source.state_dict())
    log.info(
        f"initialized weights from {trainer.cfg.train.init_from}; optimizer, LR schedule and update count start fresh"
    )
