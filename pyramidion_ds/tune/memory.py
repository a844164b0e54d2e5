"""Per-GPU memory of one training configuration: model states (DeepSpeed's estimators) + activations.

    per-GPU bytes = model states (params, grads, optimizer; ZeRO stage × offload)
                  + activations of one micro-batch (our analytic model of the pyramid, below)

Model states come from DeepSpeed's own estimators for stages 2 and 3
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``: the functions
whose tables ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` print), fed with parameter counts
computed from the config, so no large model is ever built. Stages 0 and 1 use the standard mixed-precision
formula: 2 (16-bit params) + 2 (16-bit grads) + 12 (fp32 master params, Adam m and v) bytes per
parameter; stage 1 partitions the 12 over the ranks.

Activations: what autograd keeps from the forward for the backward, plus the largest transient of the
backward, counted tensor by tensor for our layers (``pyramidion_ds.model``) and calibrated against real
forward+backward steps (``measure.py``, table in docs/tuning.md)::

    encoder layer at width n (per example; b = bytes per activation, 2 in bf16):
      x, LN out, q, k, v, attention out, merged heads, x+attn, LN out  9·n·d·b
      fc1 out, gelu out                                                 2·n·f·b
      two dropout masks (bool), LN stats, attention log-sum-exp          2·n·d + 16·n + 4·H·n
    attention is SDPA's fused kernel (flash / memory-efficient, CPU flash): no n×chunk score matrix is
    kept, so chunking changes time, not memory (``attention="math"`` adds H·n·chunk·(b + 1) per layer).
    pooling after a stage of width n: the stage output n·d·b + scores and the top-k plan (~n·(48 + 8·rounds))
    decoder layer (t target, k pooled source positions): 14·t·d·b + 2·t·f·b + masks + 2·k·d·b (source K/V)
    logits: B×t×V in b (kept by the caller) + log-probs in fp32; backward transient ~ 2 more fp32 copies
    plus the V×d output-projection gradient.

Activation checkpointing (``train.activation_checkpointing``): ``stage`` keeps only each encoder stage's
input (and, for the decoder, each layer's input and its source K/V), ``layer`` each encoder layer's input;
the backward then recomputes one block at a time, so the peak is the larger of (everything kept + the
logits transient) and (what is kept up to a block + that block's recompute + its gradient transient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.encoder import encoder_stages  # the model's own stage grouping, from the config alone

GIB = 2**30

#: bytes per activation element for train.precision
ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: offload choices: none; optimizer states to CPU; optimizer states and parameters to CPU (stage 3 only)
OFFLOADS = ("none", "optimizer", "all")
#: DeepSpeed's default head-room factor on CPU memory in its estimators
BUFFER_FACTOR = 1.5

# calibrated constants (see docs/tuning.md for the measurements behind them)
POOL_BYTES_PER_POSITION = 48  #: scores, sigmoid, slot/weight per position, flat member indices
POOL_BYTES_PER_ROUND = 8  #: per position and successive-halving round (mixing weights)
LOGITS_TRANSIENT_FP32 = 2  #: extra fp32 B×t×V copies alive at the start of the backward
GRAD_TRANSIENT_WIDE = 2  #: n·f-sized gradients alive while a layer runs its backward
GRAD_TRANSIENT_NARROW = 3  #: n·d-sized gradients alive while a layer runs its backward


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    total: int  #: all parameters (tied embedding counted once)
    largest_layer: int  #: most parameters owned directly by one module (DeepSpeed's definition)


def count_parameters(m) -> ParamCount:
    """Parameter count of ``PyramidionModel(m)`` from the config alone (checked against a built model)."""
    d, f = m.d_model, m.ffn_dim
    attention = 4 * (d * d + d)
    ffn = d * f + f + f * d + d
    norm = 2 * d
    encoder_layer = attention + ffn + 2 * norm
    decoder_layer = 2 * attention + ffn + 3 * norm
    total = m.vocab_size * d
    total += m.encoder_layers * (encoder_layer + d + 1)  # + one scorer Linear(d, 1) per layer
    total += m.decoder_layers * decoder_layer
    if m.normalize_before:
        total += 2 * norm  # final encoder and decoder LayerNorms
    largest = max(m.vocab_size * d, d * d + d, d * f + f, f * d + d)
    if m.positions == "learned":
        total += (m.max_source_positions + m.max_target_positions) * d
        largest = max(largest, m.max_source_positions * d)
    return ParamCount(total, largest)


# ------------------------------------------------------------------------------------------------
# model states
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStates:
    gpu_bytes: int
    cpu_bytes_per_node: int


def model_states(params: ParamCount, stage: int, offload: str, num_nodes: int, gpus_per_node: int) -> ModelStates:
    """Per-GPU and per-node CPU bytes of parameters, gradients and Adam states (mixed precision).

    Stages 2 and 3 ask DeepSpeed's estimators (``zero_init`` on, as ``build_model`` constructs under
    ``deepspeed.zero.Init``); stage 0/1 use 2+2+12 bytes per parameter (stage 1: the 12 partitioned).
    """
    if offload not in OFFLOADS:
        raise ValueError(f"offload: got {offload!r}, expected one of {', '.join(OFFLOADS)}")
    if offload == "all" and stage != 3:
        raise ValueError("offload 'all' (parameters to CPU) needs ZeRO stage 3")
    if offload != "none" and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage >= 1")
    total, gpus = params.total, num_nodes * gpus_per_node
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=total,
            largest_layer_params=params.largest_layer,
            num_gpus_per_node=gpus_per_node,
            num_nodes=num_nodes,
            cpu_offload=offload != "none",
            cpu_offload_params=offload == "all",
            zero_init=True,
            additional_buffer_factor=BUFFER_FACTOR,
        )
        return ModelStates(int(gpu), int(cpu))
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=total,
            num_gpus_per_node=gpus_per_node,
            num_nodes=num_nodes,
            cpu_offload=offload == "optimizer",
            additional_buffer_factor=BUFFER_FACTOR,
        )
        return ModelStates(int(gpu), int(cpu))
    if stage == 1:
        if offload == "optimizer":  # as DeepSpeed's stage-1/2 offload: 16-bit params + grads stay
            cpu = total * max(4 * gpus, 16) * BUFFER_FACTOR
            return ModelStates(int(4 * total), int(cpu))
        return ModelStates(int(4 * total + 12 * total / gpus), int(4 * total * gpus_per_node * BUFFER_FACTOR))
    return ModelStates(int(16 * total), int(4 * total * gpus_per_node * BUFFER_FACTOR))


# ------------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------------


@dataclass
class Block:
    """A unit of the backward: bytes it keeps after the forward, and (if checkpointed) recomputes."""

    name: str
    kept: int
    recompute: int = 0
    grad_transient: int = 0


@dataclass
class ActivationEstimate:
    peak_bytes: int
    kept_bytes: int  #: kept from the forward for the backward
    logits_bytes: int  #: logits transient at the start of the backward
    blocks: list[Block] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def _padded(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


def _layer_norm_stats(n: int) -> int:
    return 2 * 4 * n  # mean and rstd in fp32


def encoder_layer_bytes(m, n: int, chunk: int, b: int, attention: str = "fused") -> int:
    """Bytes one encoder layer keeps per example at width ``n`` (its input included)."""
    d, f, heads = m.d_model, m.ffn_dim, m.num_heads
    n_pad = _padded(n, chunk)
    mask = 1 if m.dropout > 0 else 0
    act_f = 2 if m.activation == "gelu" else 1  # gelu keeps its input, fc2 its output; relu shares one
    total = 4 * n * d * b + 5 * n_pad * d * b  # x, LN out, x+attn, LN out | q, k, v, attn out, merged
    total += act_f * n * f * b + (n * f if m.activation_dropout > 0 else 0)
    total += 2 * n * d * mask + 2 * _layer_norm_stats(n) + 4 * heads * n_pad
    if n_pad != n:
        total += n_pad * d * b  # the padded copy the projections read
    if attention == "math":  # unfused SDPA keeps the chunk×chunk weights (+ dropout/bool masks)
        total += heads * n_pad * min(chunk, n_pad) * (b + 1)
    return total


def decoder_layer_bytes(m, t: int, b: int) -> int:
    """Bytes one decoder layer keeps per example for ``t`` target positions (source K/V excluded)."""
    d, f, heads = m.d_model, m.ffn_dim, m.num_heads
    mask = 1 if m.dropout > 0 else 0
    act_f = 2 if m.activation == "gelu" else 1
    total = 14 * t * d * b + act_f * t * f * b + 3 * t * d * mask
    total += 3 * _layer_norm_stats(t) + 2 * 4 * heads * t
    return total


def pooling_bytes(m, n: int, k: int, b: int) -> int:
    """Scorer + successive-halving top-k from width n to k, per example (stage output included)."""
    rounds = 0
    width = n
    while width > k:
        width = max(k, (width + 1) // 2)
        rounds += 1
    return n * m.d_model * b + n * (POOL_BYTES_PER_POSITION + POOL_BYTES_PER_ROUND * rounds + b)


def activation_bytes(
    m,
    batch_size: int,
    src_len: int,
    tgt_len: int,
    *,
    precision: str = "bf16",
    checkpointing: str = "off",
    attention: str = "fused",
) -> ActivationEstimate:
    """Peak activation bytes of one forward+backward of ``batch_size`` examples (above params + grads).

    ``m`` is a ModelConfig with ``vocab_size`` set. ``checkpointing``: off | stage | layer.
    """
    if checkpointing not in ("off", "stage", "layer"):
        raise ValueError(f"checkpointing: got {checkpointing!r}, expected off, stage or layer")
    b = ACTIVATION_BYTES[precision]
    d, f, vocab = m.d_model, m.ffn_dim, m.vocab_size
    mask = 1 if m.dropout > 0 else 0
    t = tgt_len
    blocks: list[Block] = []

    # embedding: token ids + dropout mask (the dropped sum is layer 0's input, counted there)
    blocks.append(Block("embed", 8 * src_len + src_len * d * mask))
    width = src_len
    for stage in encoder_stages(m, src_len):
        layers, stage_width, chunk, pooled = stage.layers, stage.width, stage.chunk_size, stage.pooled_width
        layer_bytes = encoder_layer_bytes(m, stage_width, chunk, b, attention)
        grad = stage_width * (GRAD_TRANSIENT_WIDE * f + GRAD_TRANSIENT_NARROW * d) * b
        stage_input = stage_width * d * b
        if checkpointing == "stage":
            blocks.append(Block(f"stage@{stage_width}", stage_input, len(layers) * layer_bytes, grad))
        else:
            for index in layers:
                if checkpointing == "layer":
                    blocks.append(Block(f"layer{index}@{stage_width}", stage_input, layer_bytes, grad))
                else:
                    blocks.append(Block(f"layer{index}@{stage_width}", layer_bytes, 0, grad))
        if pooled is not None:
            blocks.append(Block(f"topk {stage_width}->{pooled}", pooling_bytes(m, stage_width, pooled, b)))
            width = pooled
    # final encoder LayerNorm: input, output (read by every layer's cross K/V projections), stats
    blocks.append(Block("encoder norm", 2 * width * d * b + _layer_norm_stats(width)))

    blocks.append(Block("decoder embed", 8 * t + t * d * mask))
    dec_layer = decoder_layer_bytes(m, t, b)
    source_kv = 2 * width * d * b
    dec_grad = t * (GRAD_TRANSIENT_WIDE * f + GRAD_TRANSIENT_NARROW * d) * b
    for index in range(m.decoder_layers):
        if checkpointing == "off":
            blocks.append(Block(f"decoder{index}", dec_layer + source_kv, 0, dec_grad))
        else:
            blocks.append(Block(f"decoder{index}", t * d * b + source_kv, dec_layer, dec_grad))
    blocks.append(Block("decoder norm", 2 * t * d * b + _layer_norm_stats(t)))
    # logits (B×t×V in the activation dtype, held by the caller) + fp32 log-probs kept by log_softmax
    logits_kept = t * vocab * (4 if b == 4 else b + 4)
    blocks.append(Block("logits", logits_kept))

    for block in blocks:
        block.kept *= batch_size
        block.recompute *= batch_size
        block.grad_transient *= batch_size
    kept = sum(block.kept for block in blocks)
    # backward starts at the loss: fp32 gradient copies of the logits + the V×d projection gradient
    logits_transient = batch_size * t * vocab * 4 * LOGITS_TRANSIENT_FP32 + vocab * d * b
    peak = kept + logits_transient
    prefix = 0
    for block in blocks:
        prefix += block.kept
        peak = max(peak, prefix + block.recompute + block.grad_transient)
    return ActivationEstimate(int(peak), int(kept), int(logits_transient), blocks)
