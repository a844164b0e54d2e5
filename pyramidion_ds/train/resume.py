"""Resume: find the checkpoint a run continues, verify it, load it; and the weights of ``--init-from``.

client_state     what a checkpoint records beside DeepSpeed's state (update, epoch, data position, RNGs)
check_resume     the newest complete, verified checkpoint of the run dir (run by the pre-flight checks)
resume           load it into the built engine
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from ..checkpoint.consolidate import consolidated_state_dict
from ..checkpoint.manifest import stale_layout_problem
from ..config import to_dict
from ..engine import load_full_state_dict
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
    trained with another vocabulary; None to start from scratch."""
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
    if info.world_size == trainer.world_size:  # ZeRO's own load: its optimizer state must fit the layout
        problem = stale_layout_problem(info.path)
        if problem:
            raise UsageError(problem)
    return info


def resume(trainer) -> bool:
    info = trainer.resume_from  # found and verified by check()
    if info is None:
        return False
    if info.world_size != trainer.world_size:
        return _resume_other_world(trainer, info)
    _, client = trainer.engine.load_checkpoint(str(trainer.ckpt.root), tag=info.tag)
    if client is None:
        raise UsageError(f"checkpoint {info.path} could not be loaded")
    trainer.update, trainer.epoch = client["update"], client["epoch"]
    trainer.train_sampler.load_state_dict(client["sampler"])
    trainer.best, trainer.bad_validations = client["best"], client["bad_validations"]
    trainer.valid_history = client.get("valid_history", [])
    set_rng_state(client["rng"][trainer.rank])
    log.info(
        f"resumed from {info.path} at update {trainer.update} (epoch {trainer.epoch}, sampler {client['sampler']})"
    )
    return True


def _resume_other_world(trainer, info) -> bool:
    """Different world size: weights through consolidation; optimizer and data position start over."""
    log.warning(
        f"checkpoint {info.path} was written by {info.world_size} ranks, this run has "
        f"{trainer.world_size}: loading consolidated weights, resetting optimizer state and the "
        f"data position (update count and LR schedule continue)"
    )
    load_weights(trainer, consolidated_state_dict(info))
    trainer.update = info.update
    trainer.epoch = int(info.manifest.get("epoch", 1))
    trainer.train_sampler.load_state_dict({"epoch": trainer.epoch, "position": 0})
    for _ in range(trainer.update):
        trainer.engine.lr_scheduler.step()
    return True


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
