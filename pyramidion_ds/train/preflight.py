"""Pre-flight checks: everything that can be wrong with a run's inputs, found before the first byte is written.

Every rank runs them (``Trainer.check``), and ``pyramidion-train --check-only`` runs them once in the launching
process: the vocabulary, the model config, the run dir's model, the DeepSpeed JSON, the data splits, the
checkpoint a resume continues (``resume.check_resume``) and ``--init-from``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError, ModelConfig, config_from_dict, to_dict
from ..config.core import read_yaml
from ..config.model import POOLING_KEYS, saved_model_dict
from ..engine import read_ds_config, resolve_ds_config, validate_ds_config
from ..errors import UsageError
from .resume import check_layout, check_resume

#: model fields that must agree between a checkpoint and the model it is loaded into
ARCHITECTURE_KEYS = (
    "d_model",
    "num_heads",
    "ffn_dim",
    "encoder_layers",
    "decoder_layers",
    "vocab_size",
    "positions",
    "normalize_before",
    "activation",
    "pad_id",
    "bos_id",
    "eos_id",
)
#: model fields that change what the same weights compute: a resume must keep them (init-from may change them)
#: architecture fields of imported checkpoints (pyramidion-import); configs saved before them hold the defaults
IMPORT_KEYS = ("scale_embedding", "layernorm_embedding", "final_logits_bias", "decoder_start_id")
#: model fields that change what the same weights compute: a resume must keep them (init-from may change them)
COMPUTATION_KEYS = ("variant", "chunk_size", "topk_base", "flip_right", "sort_back", "scorer_input", "scorer_centre")


def architecture_mismatch(saved: dict, current: dict) -> str | None:
    for key in ARCHITECTURE_KEYS:
        if saved.get(key) != current.get(key) and not (key == "vocab_size" and not saved.get(key)):
            return f"model.{key} is {saved.get(key)!r} there, {current.get(key)!r} here"
    defaults = to_dict(ModelConfig())
    for key in IMPORT_KEYS:
        if saved.get(key, defaults[key]) != current.get(key, defaults[key]):
            return f"model.{key} is {saved.get(key, defaults[key])!r} there, {current.get(key, defaults[key])!r} here"
    if saved.get("positions") == "learned" and saved.get("max_source_positions") != current.get("max_source_positions"):
        return "learned positions of another max_source_positions"
    return None


def computation_mismatch(saved: dict, current: ModelConfig) -> str | None:
    """What makes the model saved as ``saved`` compute otherwise than ``current``: the architecture, and
    what the same weights would do differently (variant, pooling widths, chunks, top-k settings)."""
    problem = architecture_mismatch(saved, to_dict(current))
    if problem:
        return problem
    saved = saved_model_dict(saved)
    pools = current.variant not in ("vanilla", "blockwise")
    for key in COMPUTATION_KEYS:
        if key in POOLING_KEYS and not pools:  # ignored by this variant (and the same variant saved)
            continue
        if key in saved and saved[key] != getattr(current, key):
            return f"model.{key} is {saved[key]!r} there, {getattr(current, key)!r} here"
    try:
        saved_widths = config_from_dict({"model": saved}).model.encoder_widths()
    except ConfigError:
        saved_widths = None
    if saved_widths != current.encoder_widths():
        return f"encoder widths (model.pooling_schedule) are {saved_widths} there, {current.encoder_widths()} here"
    return None


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse a run dir whose checkpoints another model wrote: resuming would train them as this one."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file() or not (run_dir / "checkpoints").is_dir():
        return
    saved = read_yaml(saved_path).get("model", {})
    problem = computation_mismatch(saved, cfg.model)
    if problem:
        raise UsageError(
            f"train.save_dir '{run_dir}' holds checkpoints of another model ({problem}); "
            f"resume with its settings, choose another save_dir, or start from its weights "
            f"with --train.init_from {run_dir}"
        )


def fill_vocab(cfg: Config) -> tuple[int, str, str]:
    """Take the vocabulary size, spm file hash and vocabulary identity from the data directory; refuse a
    contradicting config."""
    from ..data import spm_identity, spm_sha256, vocab_size

    data_dir = Path(cfg.data.data)
    if not cfg.data.data:
        raise UsageError("data.data is empty: point it at a directory written by pyramidion-preprocess")
    if not (data_dir / "meta.json").is_file():
        raise UsageError(
            f"data.data: '{data_dir}' has no meta.json; run pyramidion-preprocess --destdir {data_dir} first"
        )
    size = vocab_size(data_dir)
    if cfg.model.vocab_size and cfg.model.vocab_size != size:
        raise UsageError(
            f"model.vocab_size is {cfg.model.vocab_size} but the data's sentencepiece model has {size} pieces"
        )
    cfg.model.vocab_size = size
    return size, spm_sha256(data_dir), spm_identity(data_dir)


def check_inputs(trainer) -> None:
    """The checks of ``Trainer.check`` in order (its ``notes`` collect the warnings)."""
    cfg = trainer.cfg
    trainer.vocab_size, trainer.spm_hash, trainer.spm_id = fill_vocab(cfg)
    cfg.model.validate()
    unused = cfg.model.drop_unused_pooling()
    if unused and trainer.rank == 0:
        trainer.notes.append(
            f"model.variant {cfg.model.variant} does not pool: ignoring {', '.join(unused)} "
            f"(the saved config.yaml records the defaults it ran with)"
        )
    check_run_dir(cfg, trainer.run_dir)
    raw_ds = read_ds_config(cfg.train.deepspeed_config)
    trainer.ds_config = resolve_ds_config(raw_ds, cfg, trainer.world_size, source=cfg.train.deepspeed_config)
    validate_ds_config(trainer.ds_config, source=cfg.train.deepspeed_config)
    trainer.open_data()
    trainer.resume_from = check_resume(trainer) if cfg.train.resume else None
    if trainer.resume_from is not None:
        # the update_freq that keeps the checkpoint's global batch may differ from the config's
        trainer.ds_config = resolve_ds_config(raw_ds, cfg, trainer.world_size, source=cfg.train.deepspeed_config)
        check_layout(trainer)
    if cfg.train.init_from:
        check_init_from(trainer)


def check_init_from(trainer) -> None:
    """--init-from must be the same architecture and vocabulary (read before anything is written)."""
    from ..checkpoint.weights import init_source

    path = trainer.cfg.train.init_from
    trainer.init_source = init_source(path, warn=trainer.notes.append, verify=trainer.verify)
    problem = architecture_mismatch(trainer.init_source.saved_model, to_dict(trainer.cfg.model))
    if problem:
        raise UsageError(f"train.init_from '{path}' is another architecture: {problem}")
    if trainer.init_source.same_vocabulary(trainer.spm_id, trainer.spm_hash) is False:
        raise UsageError(
            f"train.init_from '{path}' used another sentencepiece vocabulary than "
            f"{Path(trainer.cfg.data.data) / 'spm.model'}; binarize the fine-tuning data with it: "
            f"pyramidion-preprocess --spm-model {Path(path) / 'spm.model'} ..."
        )
