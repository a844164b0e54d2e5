"""The pyramid encoder: stages of layers at one width, a scorer and the top-k between stages.

::

    tokens B×n ─ embed + positions ─> B×n×d
      stage 0: layers at width n ─> scorer ([LN] → Linear(d,1) → centre → σ + 1e-5) ─> top-k to w1 ┐
      stage 1: layers at width w1 ─> scorer ──> top-k to w2 ─────────────────────────────────┤
      ...                                                                                    │
      last stage ──> (final LayerNorm when pre-norm) ──> EncoderOut: hidden B×k×d, mask B×k <┘

``cfg.encoder_widths()`` gives every layer's output width; a layer whose output width is below its
input width ends a stage. Inputs shorter than ``max_source_positions`` pool to min(width, current)
(no pooling once the current width is already small enough). Variants differ only in that list and in
the chunk size (vanilla: one chunk = the whole sequence), so every variant has the same parameters: a
scorer exists for every layer, used only where that layer pools.

A scorer reads the residual stream as it is (``model.scorer_input: hidden``) or its parameter-free
layer-normalised copy, ``[LN]`` above (``layer_norm``): the stream grows layer by layer, and read raw
the scores saturate in the sigmoid and the ranking between slots is lost. Neither choice adds
parameters, so one checkpoint loads with either.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .layers import EncoderLayer, PositionEmbedding
from .topk import Pooled, centre_logits, pool_by_logits, score_and_pool

__all__ = ["Encoder", "EncoderOut", "PoolingInfo", "Scorer", "centre_logits", "encoder_stages", "pooling_layers"]

#: checkpoint_fn(function, *args) -> function(*args), e.g. a wrapper of torch.utils.checkpoint.checkpoint
CheckpointFn = Callable[..., Tensor]


@dataclass
class Stage:
    """Layers run at one width; ``pooled_width`` is the top-k target after them (None: no pooling)."""

    layers: list[int]
    width: int
    chunk_size: int
    pooled_width: Optional[int]


class PoolingInfo:
    """What one top-k kept, for statistics, the selection report and the explain page. Each is made when read
    (the fused Triton path keeps them in its workspaces: a training step that reads none dispatches nothing
    for them); ``input_scores`` and ``pooled_scores`` are detached."""

    def __init__(
        self,
        after_layer: int,
        input_width: int,
        output_width: int,
        pooled: Pooled,
        previous: Optional["PoolingInfo"],
        input_mask: Tensor,
    ):
        self.after_layer, self.input_width, self.output_width = after_layer, input_width, output_width
        self._pooled, self._previous, self._source_positions = pooled, previous, None
        self.input_mask = input_mask  #: B×input_width, True = a real slot rated by the scorer

    @property
    def scorer_output(self) -> Tensor:
        """B×input_width as the scorer made it (may require grad on the torch path)."""
        return self._pooled.scores

    @property
    def top_k_scores(self) -> Tensor:
        """B×output_width as the top-k made it (may require grad on the torch path)."""
        return self._pooled.pooled_scores

    @property
    def mask(self) -> Tensor:
        """B×output_width, True = real content."""
        return self._pooled.mask

    @property
    def source_positions(self) -> Tensor:
        """B×output_width, the original token position dominating each kept slot."""
        if self._source_positions is None:
            index = self._pooled.source_index
            self._source_positions = (
                index if self._previous is None else self._previous.source_positions.gather(1, index)
            )
        return self._source_positions

    @property
    def input_scores(self) -> Tensor:
        """B×input_width, the scorer's ratings of the slots it pooled (detached)."""
        return self.scorer_output.detach()

    @property
    def pooled_scores(self) -> Tensor:
        """B×output_width (detached)."""
        return self.top_k_scores.detach()


@dataclass
class EncoderOut:
    hidden: Tensor  #: B×k×d, the pooled encoder output
    mask: Tensor  #: B×k bool, True = real content (False = padding)
    pooling: list[PoolingInfo] = field(default_factory=list)
    #: False when no slot is padding (known on the host): cross-attention then runs without a mask
    padded: bool = True
    #: B×k, original token position dominating each output slot (None: made from ``pooling`` when read)
    selected_positions: Optional[Tensor] = None

    @property
    def source_positions(self) -> Tensor:
        """B×k, the original token position dominating each output slot."""
        if self.selected_positions is None:
            if self.pooling:
                self.selected_positions = self.pooling[-1].source_positions
            else:
                batch, n = self.mask.shape
                self.selected_positions = torch.arange(n, device=self.mask.device).expand(batch, n)
        return self.selected_positions

    @property
    def padding_mask(self) -> Tensor:
        """fairseq's ``encoder_padding_mask``: True = padding."""
        return ~self.mask

    def select(self, source_order: Tensor) -> "EncoderOut":
        """Rows ``source_order`` (e.g. repeat each source per beam, or drop finished sources)."""
        return EncoderOut(
            self.hidden.index_select(0, source_order),
            self.mask.index_select(0, source_order),
            self.pooling,
            self.padded,
            self.source_positions.index_select(0, source_order),
        )

    @property
    def attention_mask(self) -> Optional[Tensor]:
        """The mask cross-attention needs: None when nothing is padding."""
        return self.mask if self.padded else None


def pooling_layers(cfg: ModelConfig, widths: Optional[list[int]] = None) -> set[int]:
    """Encoder layers followed by a scorer + top-k in the configured pyramid."""
    widths = cfg.encoder_widths() if widths is None else widths
    previous = [cfg.max_source_positions] + widths[:-1]
    return {i for i, (w_in, w_out) in enumerate(zip(previous, widths, strict=True)) if w_out < w_in}


def encoder_stages(
    cfg: ModelConfig, input_width: int, widths: Optional[list[int]] = None, pooling: Optional[set[int]] = None
) -> list[Stage]:
    """Group the encoder's layers into stages for an input of ``input_width`` tokens (config only).

    A stage ends at every configured pooling layer whatever the input width, so every batch runs the
    same modules in the same order (ZeRO-3 gathers parameters module by module, collectively). A batch
    already narrower than a layer's target gets ``pooled_width=None`` there.
    """
    widths = cfg.encoder_widths() if widths is None else widths
    pooling = pooling_layers(cfg, widths) if pooling is None else pooling
    full_attention = cfg.variant == "vanilla"
    stages, layers, width = [], [], input_width
    for index, target in enumerate(widths):
        layers.append(index)
        if index in pooling or index == len(widths) - 1:
            chunk = width if full_attention else min(width, cfg.chunk_size)
            stages.append(Stage(layers, width, chunk, target if target < width else None))
            layers, width = [], min(width, target)
    return stages


class Scorer(nn.Linear):
    """A top-k scorer, ``Linear(d, 1)`` (parameters ``weight`` 1×d and ``bias``, as before it had a class).

    ``scorer(x)`` gives the logits B×n×1; ``scorer(x, pool=...)`` scores and pools in one call
    (:func:`.topk.score_and_pool`, fused into one operator on the Triton path) and returns
    ``(values, mask, pooled)``. Both run inside this module's forward, where ZeRO-3 has gathered its
    parameters; it gathers them again for the backward from a hook on the tensors the forward returns, so the
    pooled values come back as a tensor of the tuple (the :class:`.topk.Pooled` beside them is not looked
    into). ``centre``: the logits are centred per document, so the bias cancels; it is not used at all (no
    gradient, in both calls, so that every data-parallel rank reduces the same parameters whatever its batch).
    """

    def __init__(self, d_model: int, centre: bool):
        super().__init__(d_model, 1)
        self.centre = centre

    def forward(self, x: Tensor, pool: Optional[dict] = None):
        bias = None if self.centre else self.bias
        if pool is None:
            return F.linear(x, self.weight, bias)
        pooled = score_and_pool(x, self.weight, bias, centre=self.centre, **pool)
        return pooled.values, pooled.mask, pooled


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.widths = cfg.encoder_widths()
        self.full_attention = cfg.variant == "vanilla"
        self.positions = PositionEmbedding(
            cfg.max_source_positions, cfg.d_model, cfg.positions == "learned", cfg.positions
        )
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model) if cfg.layernorm_embedding else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.scorers = nn.ModuleList(Scorer(cfg.d_model, cfg.scorer_centre) for _ in range(cfg.encoder_layers))
        self.scorer_reads_layer_norm = cfg.scorer_input == "layer_norm"
        self.layer_norm = nn.LayerNorm(cfg.d_model) if cfg.normalize_before else None
        #: layers followed by a scorer + top-k in the configured pyramid (at the full input width)
        self.pooling_layers = pooling_layers(cfg, self.widths)
        self.centre_scores = cfg.scorer_centre  # see centre_logits
        self.checkpoint_fn: Optional[CheckpointFn] = None
        self.checkpoint_granularity = "off"

    def stages(self, input_width: int) -> list[Stage]:
        return encoder_stages(self.cfg, input_width, self.widths, self.pooling_layers)

    def score_logits(self, layer: int, x: Tensor) -> Tensor:
        """The scorer after ``layer`` applied to x: B×n×d → B×n×1 logits (before the sigmoid; without the bias
        when the scores are centred)."""
        if self.scorer_reads_layer_norm:
            x = F.layer_norm(x, x.shape[-1:])  # no affine parameters: the weights layout is unchanged
        return self.scorers[layer](x)

    def forward(self, embedded: Tensor, real_mask: Tensor, padded: Optional[bool] = None) -> EncoderOut:
        """embedded: B×n×d scaled token embeddings; real_mask: B×n (True = token). ``padded=False`` says
        (from the host) that no position is padding; None finds out."""
        n = embedded.size(1)
        x = embedded + self.positions(n).to(embedded.dtype)
        x = self.dropout(x if self.layernorm_embedding is None else self.layernorm_embedding(x))
        pooling = []
        # the fewest real tokens in a row, known on the host: a stage narrower than that has no padding
        # (padding ranks last in the top-k), so its attention runs without a mask (flash kernels), as does
        # the decoder's cross-attention when the output has none. Eager: one host sync per forward. A
        # compiled graph cannot branch on data: unknown (always masked, FlexAttention) unless ``padded``
        # says False, which compiles a graph of its own with no mask anywhere
        if padded is False:
            fewest_real: Optional[int] = n
        elif torch.compiler.is_compiling():
            fewest_real = None
        else:
            fewest_real = int(real_mask.sum(dim=1).min())
        for stage in self.stages(n):
            stage_padded = fewest_real is None or fewest_real < stage.width
            x = self._run_stage(stage, x, real_mask if stage_padded else None)
            last = stage.layers[-1]
            if stage.pooled_width is None:
                if last in self.pooling_layers:
                    # the batch is already narrower than this layer's target, so nothing is pooled; the
                    # scorer still runs (a zero contribution) so that every rank, whatever its batch
                    # width, gathers and reduces the same parameters in the same order
                    x = x + 0.0 * self.score_logits(last, x)
                continue
            pooled = self._score_and_pool(last, x, real_mask, stage.pooled_width)
            previous = pooling[-1] if pooling else None
            pooling.append(PoolingInfo(last, stage.width, stage.pooled_width, pooled, previous, real_mask))
            x, real_mask = pooled.values, pooled.mask
            if fewest_real is not None:
                fewest_real = min(fewest_real, stage.pooled_width)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return EncoderOut(x, real_mask, pooling, fewest_real is None or fewest_real < x.size(1))

    def _score_and_pool(self, layer: int, x: Tensor, real_mask: Tensor, k: int) -> Pooled:
        """The scorer after ``layer`` and the top-k to ``k`` slots."""
        options = dict(
            base=self.cfg.topk_base,
            flip_right=self.cfg.flip_right,
            sort_back=self.cfg.sort_back,
            hard=self.cfg.hard_topk,
        )
        scorer = self.scorers[layer]
        if isinstance(scorer, Scorer):
            pool = dict(mask=real_mask, k=k, layer_norm_input=self.scorer_reads_layer_norm)
            values, mask, pooled = scorer(x, pool={**pool, **options})
            return Pooled(values, mask, pooled)  # the values as the module returned them (ZeRO-3's hook)
        # a scorer module of another kind (experiments replace them): it gives logits
        logits = self.score_logits(layer, x).squeeze(-1).float()
        return pool_by_logits(x, logits, real_mask, k, self.centre_scores, **options)

    def _run_stage(self, stage: Stage, x: Tensor, real_mask: Tensor) -> Tensor:
        checkpoint = self.checkpoint_fn if torch.is_grad_enabled() else None
        if checkpoint is not None and self.checkpoint_granularity == "stage":
            return checkpoint(functools.partial(self._layers, stage.layers, stage.chunk_size), x, real_mask)
        for index in stage.layers:
            if checkpoint is not None and self.checkpoint_granularity == "layer":
                x = checkpoint(functools.partial(self.layers[index], chunk_size=stage.chunk_size), x, real_mask)
            else:
                x = self.layers[index](x, real_mask, stage.chunk_size)
        return x

    def _layers(self, layer_indices: list[int], chunk_size: int, x: Tensor, real_mask: Tensor) -> Tensor:
        for index in layer_indices:
            x = self.layers[index](x, real_mask, chunk_size)
        return x
