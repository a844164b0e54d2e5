"""Import a Hugging Face PEGASUS or BART checkpoint (a local model dir) as a Pyramidion export dir.

::

    HF_DIR/config.json              ──> EXPORT/config.yaml         our model config (+ the chosen variant,
    HF_DIR/model.safetensors                                       max_source_positions, pooling schedule)
      (or pytorch_model.bin,        ──> EXPORT/model.safetensors   weights in our layout
       read with weights_only)
    HF_DIR/spiece.model (PEGASUS)   ──> EXPORT/spm.model + tokenizer.json: the tokenizer
    HF_DIR/tokenizer.json or        ──> EXPORT/bpe.json + tokenizer.json
      vocab.json + merges.txt (BART)
                                    ──> EXPORT/export.json         source dir, family, vocabulary identity

What the model has no equivalent for in our default config becomes a model option: embedding scale
(``scale_embedding``), BART's ``layernorm_embedding``, the ``final_logits_bias``, the decoder start token
(``decoder_start_id``), PEGASUS's sinusoidal frequencies (``positions: sinusoidal_pegasus``) and each
family's special ids. Positions beyond the checkpoint's (``max_source_positions`` above BART's 1,024)
are copies of the pretrained table, repeated as LED did; sinusoidal ones are computed. The scorers of
the pooling variants are new: they keep the freshly built model's initialisation (PyTorch's Linear
init under seed 0), see docs/pretrained.md. The export appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..config import Config, ConfigError
from ..config.core import to_dict, write_yaml
from ..errors import UsageError
from .export import EXPORT_META, EXPORT_WEIGHTS, write_safetensors
from .safe_load import safe_torch_load

#: architectures (config.json "architectures") and model types this importer reads
FAMILIES = {"PegasusForConditionalGeneration": "pegasus", "BartForConditionalGeneration": "bart"}
ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"'{path}': not a readable JSON file ({str(err).splitlines()[0]})") from None


def read_hf_config(hf_dir: Path) -> tuple[str, dict]:
    """(family, config.json) of a Hugging Face model dir; one-line errors for what is not PEGASUS or BART."""
    if not hf_dir.is_dir():
        raise UsageError(f"'{hf_dir}' is not a directory (expected a Hugging Face model dir)")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"'{hf_dir}' has no config.json (not a Hugging Face model dir)")
    hf = _read_json(path)
    architectures = hf.get("architectures") or []
    family = next((FAMILIES[a] for a in architectures if a in FAMILIES), None)
    if family is None and not architectures:
        family = {"pegasus": "pegasus", "bart": "bart"}.get(hf.get("model_type"))
    if family is None or hf.get("model_type") not in (None, family):
        what = ", ".join(architectures) or f"model_type {hf.get('model_type')!r}"
        raise UsageError(f"'{path}': unsupported architecture {what}; pyramidion-import reads {', '.join(FAMILIES)}")
    return family, hf


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: ``model.safetensors`` (never unpickles) or ``pytorch_model.bin`` loaded
    with ``weights_only``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, binary = hf_dir / "model.safetensors", hf_dir / "pytorch_model.bin"
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as err:
            raise UsageError(f"'{st}': not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if binary.is_file():
        state = safe_torch_load(binary, map_location="cpu")  # a CheckpointError (one line) on anything unsafe
        if not isinstance(state, dict):
            raise UsageError(f"'{binary}': expected a state dict, got {type(state).__name__}")
        return state
    raise UsageError(f"'{hf_dir}' has no model.safetensors nor pytorch_model.bin (the weights)")


def model_section(
    family: str,
    hf: dict,
    special: dict,
    variant: str,
    max_source_positions: Optional[int],
    pooling_schedule,
    chunk_size: Optional[int],
) -> dict:
    """Our ``model:`` config section for a checkpoint of ``family`` with config.json ``hf``."""

    def need(key):
        if key not in hf:
            raise UsageError(f"config.json: no '{key}' (a {family} config has it)")
        return hf[key]

    for ours, (a, b) in {
        "num_heads": ("encoder_attention_heads", "decoder_attention_heads"),
        "ffn_dim": ("encoder_ffn_dim", "decoder_ffn_dim"),
    }.items():
        if need(a) != need(b):
            raise UsageError(f"config.json: {a} {hf[a]} != {b} {hf[b]}; model.{ours} is one value for both")
    activation = need("activation_function")
    if activation not in ACTIVATIONS:
        raise UsageError(f"config.json: activation_function {activation!r} is not supported (expected gelu or relu)")
    if hf.get("tie_word_embeddings", True) is False:
        raise UsageError("config.json: tie_word_embeddings false is not supported (the output layer is the embedding)")
    max_positions = int(need("max_position_embeddings"))
    start = hf.get("decoder_start_token_id")
    section = dict(
        preset="large" if int(need("d_model")) >= 1024 else "base" if int(hf["d_model"]) >= 512 else "debug",
        variant=variant,
        d_model=int(need("d_model")),
        num_heads=int(hf["encoder_attention_heads"]),
        ffn_dim=int(hf["encoder_ffn_dim"]),
        encoder_layers=int(need("encoder_layers")),
        decoder_layers=int(need("decoder_layers")),
        vocab_size=int(need("vocab_size")),
        max_source_positions=int(max_source_positions or max_positions),
        max_target_positions=max_positions,
        pooling_schedule=pooling_schedule,
        positions="sinusoidal_pegasus" if family == "pegasus" else "learned",
        normalize_before=family == "pegasus",
        dropout=float(hf.get("dropout", 0.1)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        activation_dropout=float(hf.get("activation_dropout", 0.0)),
        activation=ACTIVATIONS[activation],
        pad_id=special["pad"],
        bos_id=special["bos"],
        eos_id=special["eos"],
        unk_id=special["unk"],
        scale_embedding=bool(hf.get("scale_embedding", family == "pegasus")),
        layernorm_embedding=family == "bart",
        final_logits_bias=True,
        decoder_start_id=int(start if start is not None else special["pad"]),
    )
    if chunk_size:
        section["chunk_size"] = int(chunk_size)
    else:
        section["chunk_size"] = min(512, section["max_source_positions"])
    return section


def _stretch_positions(table: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` learned positions from a pretrained table: the table repeated (LED's copies), cut to size."""
    copies = -(-rows // table.size(0))
    return table.repeat(copies, 1)[:rows].clone()


def convert_state_dict(family: str, hf_state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Our state dict for ``model`` (a freshly built PyramidionModel) from the checkpoint's tensors."""
    cfg = model.cfg
    state = dict(model.state_dict())  # the built model's tensors; converted ones replace them (no second copy)
    hf_state = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in hf_state.items()}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise UsageError(f"the checkpoint has no tensor '{name}' (a {family} checkpoint of this config has it)")
        used.add(name)
        return hf_state[name].float()

    shared_name = next((n for n in ("shared.weight", "encoder.embed_tokens.weight") if n in hf_state), "shared.weight")
    new = {"embed_tokens.weight": take(shared_name)}
    if "final_logits_bias" in hf_state:
        new["embed_tokens.final_logits_bias"] = take("final_logits_bias").reshape(-1)
    if "lm_head.weight" in hf_state and not torch.equal(hf_state["lm_head.weight"].float(), new["embed_tokens.weight"]):
        raise UsageError("the checkpoint's lm_head.weight differs from its embedding (untied: not supported)")
    for side, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        if family == "bart":
            table = take(f"{side}.embed_positions.weight")[2:]  # BART's learned positions start at offset 2
            rows = cfg.max_source_positions if side == "encoder" else cfg.max_target_positions
            new[f"{side}.positions.weight"] = _stretch_positions(table, rows)
            for p in ("weight", "bias"):
                new[f"{side}.layernorm_embedding.{p}"] = take(f"{side}.layernorm_embedding.{p}")
        else:
            for p in ("weight", "bias"):
                new[f"{side}.layer_norm.{p}"] = take(f"{side}.layer_norm.{p}")
        for i in range(layers):
            hp, op = f"{side}.layers.{i}.", f"{side}.layers.{i}."
            attentions = ("self_attn", "encoder_attn") if side == "decoder" else ("self_attn",)
            for p in ("weight", "bias"):
                for attn in attentions:
                    q, k, v = (take(f"{hp}{attn}.{x}_proj.{p}") for x in "qkv")
                    if attn == "self_attn":
                        new[f"{op}{attn}.qkv_proj.{p}"] = torch.cat([q, k, v])
                    else:
                        new[f"{op}{attn}.q_proj.{p}"] = q
                        new[f"{op}{attn}.kv_proj.{p}"] = torch.cat([k, v])
                    new[f"{op}{attn}.out_proj.{p}"] = take(f"{hp}{attn}.out_proj.{p}")
                    new[f"{op}{attn}_layer_norm.{p}"] = take(f"{hp}{attn}_layer_norm.{p}")
                new[f"{op}ffn.fc1.{p}"] = take(f"{hp}fc1.{p}")
                new[f"{op}ffn.fc2.{p}"] = take(f"{hp}fc2.{p}")
                new[f"{op}final_layer_norm.{p}"] = take(f"{hp}final_layer_norm.{p}")
    # tied copies of the embedding, and PEGASUS's sinusoidal tables (computed, never learned)
    copies = {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if family == "pegasus":
        copies |= {"encoder.embed_positions.weight", "decoder.embed_positions.weight"}
    unmapped = sorted(set(hf_state) - used - copies)
    if unmapped:
        raise UsageError(
            f"the checkpoint has tensor '{unmapped[0]}' that a plain {family} checkpoint does not "
            f"({len(unmapped)} such); this variant of the architecture is not supported"
        )
    for name, tensor in new.items():
        if name not in state:
            raise UsageError(f"internal: converted tensor '{name}' has no place in the model")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise UsageError(
                f"the checkpoint's tensor for '{name}' is {tuple(tensor.shape)}, the model from config.json "
                f"expects {tuple(state[name].shape)}"
            )
        state[name] = tensor.contiguous()
    return state


def import_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    variant: str = "pyramidion",
    max_source_positions: Optional[int] = None,
    pooling_schedule=None,
    chunk_size: Optional[int] = None,
    dtype: str = "fp32",
) -> Path:
    """Write the export dir ``out_dir`` for the Hugging Face checkpoint in ``hf_dir``; returns its path."""
    from ..data.tokenizer import import_hf_tokenizer, tokenizer_record
    from ..model import PyramidionModel
    from .export import DTYPES

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"'{out}' exists and is not empty; choose another output dir")
    family, hf = read_hf_config(hf_dir)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # removed again on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        vocab = hf.get("vocab_size")
        if not isinstance(vocab, int):
            raise UsageError(f"'{hf_dir / 'config.json'}': no integer vocab_size")
        special = import_hf_tokenizer(family, hf_dir, tmp, vocab)  # checks the tokenizer files before the weights
        section = model_section(family, hf, special, variant, max_source_positions, pooling_schedule, chunk_size)
        cfg = _config(section)  # a bad flag fails before the (large) weights are read
        hf_state = read_hf_weights(hf_dir)
        torch.manual_seed(0)  # the new parts (scorers) get the same initialisation on every import
        model = PyramidionModel(cfg.model)
        state = convert_state_dict(family, hf_state, model)
        del hf_state, model
        count = write_safetensors(tmp / EXPORT_WEIGHTS, state, DTYPES[dtype], metadata={"format": "pt"})
        write_yaml(to_dict(cfg), tmp / "config.yaml")
        meta = {
            "source_hf_dir": str(hf_dir.resolve()),
            "family": family,
            "architecture": (hf.get("architectures") or [family])[0],
            "dtype": dtype,
            "tensors": count,
            **tokenizer_record(tmp),
        }
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            for directory in created:  # innermost first; only the ones this call made, and only if empty
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
    return out


def _config(section: dict) -> Config:
    from ..config import config_from_dict

    try:
        cfg = config_from_dict({"model": section})
        cfg.model.validate()
    except ConfigError as err:
        raise UsageError(str(err)) from None
    return cfg
