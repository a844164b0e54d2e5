"""Model section of the config: size presets, variants and the pooling schedule.

The pooling schedule says how wide the encoder's sequence is after each layer::

    input (max_source_positions = 8192 tokens)
      layer 0 ── 8192 ──┐ stage 0
      layer 1 ── 4096 ──┘ (scorer + top-k after layer 1)   <- schedule [8192, 4096, 2048, ...]
      layer 2 ── 2048      ...
      ...
      decoder cross-attends to the last width only

Layer ``i`` runs at the width the previous layer produced (layer 0 at ``max_source_positions``); when
its output width is smaller, a scorer rates the representations and the successive-halving top-k
keeps that many. Consecutive layers at one width form a *stage* (the unit of activation checkpointing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

from .core import ConfigError, option

VARIANTS = ("vanilla", "blockwise", "transpooler", "pyramidion")
#: settings of the scorer and top-k, which only the pooling variants (transpooler, pyramidion) use
POOLING_KEYS = (
    "pooling_schedule",
    "topk_base",
    "flip_right",
    "sort_back",
    "hard_topk",
    "scorer_input",
    "scorer_centre",
)

#: what a model config saved before a field existed meant by its absence (a saved config lists every field,
#: a user's YAML only what it sets): runs and exports from before keep computing as they did
SAVED_BEFORE_FIELD = {"scorer_centre": False}


def saved_model_dict(saved: dict) -> dict:
    """A model config dict read from a run dir or export, with the fields it predates set as it meant them."""
    return {**SAVED_BEFORE_FIELD, **saved}


#: Size presets. A field the user sets explicitly wins over the preset's value.
MODEL_PRESETS: dict[str, dict] = {
    # tiny: every unit and integration test runs in seconds on a CPU
    "debug": dict(
        d_model=64,
        num_heads=4,
        ffn_dim=128,
        encoder_layers=3,
        decoder_layers=2,
        max_source_positions=512,
        max_target_positions=128,
        chunk_size=64,
    ),
    # the paper's deep model
    "base": dict(
        d_model=512,
        num_heads=8,
        ffn_dim=2048,
        encoder_layers=6,
        decoder_layers=6,
        max_source_positions=8192,
        max_target_positions=512,
        chunk_size=512,
    ),
    "large": dict(
        d_model=1024,
        num_heads=16,
        ffn_dim=4096,
        encoder_layers=12,
        decoder_layers=12,
        max_source_positions=8192,
        max_target_positions=512,
        chunk_size=512,
    ),
}

ScheduleSpec = Union[list[int], dict, str, None]


@dataclass
class ModelConfig:
    preset: str = option(
        "debug", "size preset filling the size fields not set explicitly", choices=tuple(MODEL_PRESETS)
    )
    variant: str = option(
        "pyramidion",
        "encoder variant: vanilla (full attention, no pooling), blockwise "
        "(chunked attention, no pooling), transpooler (pool once after the last layer), "
        "pyramidion (pool between layers)",
        choices=VARIANTS,
    )
    d_model: Optional[int] = option(None, "model width (embedding dimension)", min=1)
    num_heads: Optional[int] = option(None, "attention heads (encoder and decoder)", min=1)
    ffn_dim: Optional[int] = option(None, "feed-forward inner width", min=1)
    encoder_layers: Optional[int] = option(None, "encoder layers", min=1)
    decoder_layers: Optional[int] = option(None, "decoder layers", min=1)
    vocab_size: int = option(0, "vocabulary size; 0 = take it from the sentencepiece model of the data", min=0)
    max_source_positions: Optional[int] = option(None, "longest source in tokens (the encoder's input width)", min=1)
    max_target_positions: Optional[int] = option(None, "longest target in tokens", min=1)
    chunk_size: Optional[int] = option(
        None, "blockwise attention chunk length (a layer of width n attends inside chunks of min(n, chunk_size))", min=1
    )
    pooling_schedule: ScheduleSpec = option(
        None,
        "encoder output width per layer: a list [8192, 4096, ...], or the release form "
        "'{0: 2048, 1: 512}' (layer -> width; unnamed layers keep the previous width); "
        "null = halve layer by layer (at most 5 halvings)",
    )
    topk_base: float = option(20.0, "base of the softmax(base**score) mixing inside each top-k pair", greater_than=1.0)
    flip_right: bool = option(True, "pair the best-scored half with the worst (else rank i with rank i)")
    sort_back: bool = option(False, "after each top-k round put survivors back in document order")
    hard_topk: bool = option(False, "inference: exact top-k selection with no mixing")
    scorer_input: str = option(
        "hidden",
        "what each top-k scorer reads: hidden (the residual stream as it is) "
        "or layer_norm (its layer-normalised copy, no affine parameters: stops the "
        "scores saturating as the residual stream grows); no new parameters, so "
        "checkpoints load with either",
        choices=("hidden", "layer_norm"),
    )
    scorer_centre: bool = option(
        True,
        "subtract each document's mean scorer logit before the sigmoid, so that mixing every pair evenly sits "
        "at score 0.5 (steepest) instead of the sigmoid's floor, where the scorer's gradient vanishes "
        "(docs/pretraining.md); false: the scorer of runs before it; no new parameters",
    )
    positions: str = option(
        "sinusoidal",
        "position embeddings: sinusoidal (fairseq's frequencies), learned, or sinusoidal_pegasus "
        "(PEGASUS's frequencies 10000**(-2j/d), for imported PEGASUS checkpoints)",
        choices=("sinusoidal", "learned", "sinusoidal_pegasus"),
    )
    normalize_before: bool = option(True, "pre-norm layers (LayerNorm before attention/FFN)")
    dropout: float = option(0.1, "dropout on residual branches and embeddings", min=0.0, max=1.0)
    attention_dropout: float = option(0.0, "dropout on attention weights", min=0.0, max=1.0)
    activation_dropout: float = option(0.0, "dropout inside the feed-forward block", min=0.0, max=1.0)
    activation: str = option("gelu", "feed-forward activation", choices=("gelu", "relu"))
    pad_id: int = option(1, "padding token id (fairseq order: <s>=0 <pad>=1 </s>=2 <unk>=3)", min=0)
    bos_id: int = option(0, "beginning-of-sentence id", min=0)
    eos_id: int = option(2, "end-of-sentence id", min=0)
    unk_id: int = option(3, "unknown-token id", min=0)
    # options of imported checkpoints (pyramidion-import); the defaults are our own models' behaviour
    scale_embedding: bool = option(True, "multiply token embeddings by sqrt(d_model) (BART: off)")
    layernorm_embedding: bool = option(
        False, "LayerNorm on the embeddings plus positions, in encoder and decoder (BART's layernorm_embedding)"
    )
    final_logits_bias: bool = option(False, "a (frozen) bias added to the output logits (BART, PEGASUS)")
    decoder_start_id: int = option(
        -1, "first decoder input token; -1 = bos_id (PEGASUS starts with <pad>, BART with </s>)", min=-1
    )

    def __post_init__(self):
        for key, value in MODEL_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def validate(self) -> None:
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"model.d_model: got {self.d_model}, expected a multiple of model.num_heads ({self.num_heads})"
            )
        if self.vocab_size and self.vocab_size <= max(self.pad_id, self.bos_id, self.eos_id, self.unk_id):
            raise ConfigError(f"model.vocab_size: got {self.vocab_size}, expected more than the special ids")
        if self.vocab_size and self.decoder_start_id >= self.vocab_size:
            raise ConfigError(
                f"model.decoder_start_id: got {self.decoder_start_id}, expected less than vocab_size {self.vocab_size}"
            )
        self.encoder_widths()  # raises on a bad schedule

    @property
    def start_id(self) -> int:
        """The decoder's first input token (``decoder_start_id``, or ``bos_id`` when that is -1)."""
        return self.bos_id if self.decoder_start_id < 0 else self.decoder_start_id

    def drop_unused_pooling(self) -> list[str]:
        """Reset the pooling settings a variant without pooling (vanilla, blockwise) ignores.

        So the saved config says what the run used, and the caller can warn once. Returns the dotted keys
        that were set to something else than their defaults."""
        if self.variant not in ("vanilla", "blockwise"):
            return []
        defaults = ModelConfig(preset=self.preset)
        dropped = []
        for key in POOLING_KEYS:
            if getattr(self, key) != getattr(defaults, key):
                dropped.append(f"model.{key}")
                setattr(self, key, getattr(defaults, key))
        return dropped

    def encoder_widths(self) -> list[int]:
        """Output width of every encoder layer, resolved for the variant (see the module docstring)."""
        full = self.max_source_positions
        if self.variant in ("vanilla", "blockwise"):
            return [full] * self.encoder_layers
        widths = parse_pooling_schedule(self.pooling_schedule, self.encoder_layers, full)
        if self.variant == "transpooler":  # same final width, reached in one pooling step
            return [full] * (self.encoder_layers - 1) + [widths[-1]]
        return widths


def default_schedule(num_layers: int, input_width: int) -> list[int]:
    """Halve the width layer by layer, spreading at most five halvings over the layers after the first."""
    if num_layers == 1:
        return [max(1, input_width // 2)]
    halvings = min(5, num_layers - 1)
    return [max(1, input_width >> (i * halvings // (num_layers - 1))) for i in range(num_layers)]


_RELEASE_ITEM = re.compile(r"^\s*(-?[^:\s]+)\s*:\s*(-?[^:\s]+)\s*$")


def parse_pooling_schedule(
    spec: ScheduleSpec, num_layers: int, input_width: int, key: str = "model.pooling_schedule"
) -> list[int]:
    """Resolve a schedule to one output width per encoder layer; never ``eval``s the string form.

    Accepts ``None`` (default halving), a list of ``num_layers`` widths, a mapping ``{layer: width}``
    or its string form ``"{0: 2048, 1: 512}"`` (unnamed layers keep the previous width; the input
    width is ``input_width``). Widths must be positive integers that never grow.
    """
    if spec is None:
        return default_schedule(num_layers, input_width)
    if isinstance(spec, str):
        spec = _parse_release_string(spec, key)
    if isinstance(spec, dict):
        mapping = {}
        for layer, width in spec.items():
            layer_i = _as_int(layer, f"{key} layer {layer!r}")
            if not 0 <= layer_i < num_layers:
                raise ConfigError(f"{key}: layer {layer_i} does not exist (the encoder has layers 0..{num_layers - 1})")
            mapping[layer_i] = _as_int(width, f"{key} width of layer {layer_i}")
        widths, current = [], input_width
        for layer in range(num_layers):
            current = mapping.get(layer, current)
            widths.append(current)
    elif isinstance(spec, (list, tuple)):
        widths = [_as_int(w, f"{key}[{i}]") for i, w in enumerate(spec)]
        if len(widths) != num_layers:
            raise ConfigError(f"{key}: got {len(widths)} widths, expected one per encoder layer ({num_layers})")
    else:
        raise ConfigError(f"{key}: got {spec!r}, expected a list of widths or a mapping layer -> width")
    previous = input_width
    for layer, width in enumerate(widths):
        if width < 1:
            raise ConfigError(f"{key}: layer {layer} width {width} must be positive")
        if width > previous:
            raise ConfigError(
                f"{key}: layer {layer} width {width} grows from {previous}; widths may only "
                f"shrink (input width {input_width})"
            )
        previous = width
    return widths


def _parse_release_string(text: str, key: str) -> dict:
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise ConfigError(f"{key}: got {text!r}, expected the form '{{0: 2048, 1: 512}}'")
    items = [item for item in body[1:-1].split(",") if item.strip()]
    mapping = {}
    for item in items:
        match = _RELEASE_ITEM.match(item)
        if not match:
            raise ConfigError(f"{key}: cannot read {item.strip()!r} in {text!r}, expected 'layer: width'")
        mapping[match.group(1)] = match.group(2)
    return mapping


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: got {value!r}, expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise ConfigError(f"{what}: got {value!r}, expected an integer")
