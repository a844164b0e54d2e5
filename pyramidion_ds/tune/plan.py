"""Enumerate (ZeRO stage × offload × checkpointing × micro-batch), estimate memory and step time, pick one.

The step-time model is relative and rough on purpose: it ranks candidates, it does not predict seconds::

    update time = compute (FLOPs × recompute factor / throughput at this micro-batch's size)
                + communication (gradients, and for ZeRO-3 parameter gathers, per micro-batch or per update)
                + offload (PCIe transfers, CPU Adam; parameters over PCIe every micro-batch for 'all')

Every candidate is scored for the same requested global batch; the fastest that fits within
``safety × GPU memory`` (and the CPU memory of a node for offload) wins.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field

import yaml

from ..model.model import training_flops  # the model's own FLOPs formula, from the config alone
from .memory import ACTIVATION_BYTES, GIB, ParamCount, activation_bytes, count_parameters, model_states

# rough hardware figures for the relative time model (H100-class node; only ratios matter)
GPU_TFLOPS = 400.0  #: achieved bf16 TFLOP/s at large micro-batches
HALF_EFFICIENCY_TOKENS = 2048  #: micro-batch source tokens at which throughput is half the achieved peak
INTRA_NODE_GBPS = 200.0  #: NVLink bus bandwidth per GPU
INTER_NODE_GBPS = 25.0  #: network bandwidth per GPU across nodes
PCIE_GBPS = 25.0
CPU_ADAM_PARAMS_PER_S = 1.0e9  #: DeepSpeed CPUAdam throughput per node
CHECKPOINT_RECOMPUTE = 4 / 3  #: forward recomputed once: (1 + 2 + 1) / (1 + 2)


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    cpu_mem_gib: float = 512.0
    device: str = "gpu"  #: "gpu", or "cpu" (CPU ranks: tests and --measure on a laptop; no offload)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def rank_name(self) -> str:
        """What one rank is, for messages: a GPU, or a CPU process with ``device="cpu"``."""
        return "GPU" if self.device == "gpu" else "CPU process"

    @property
    def memory_name(self) -> str:
        """The memory a rank's budget is about: GPU memory, or RAM with ``device="cpu"``."""
        return "GPU" if self.device == "gpu" else "RAM"


@dataclass
class Candidate:
    stage: int
    offload: str
    checkpointing: str
    micro_batch: int
    update_freq: int
    states_gib: float
    activations_gib: float
    buffers_gib: float
    cpu_gib_per_node: float
    time: float = 0.0  #: estimated seconds per update (relative use only)
    fits: bool = False
    why_not: str = ""

    @property
    def gpu_gib(self) -> float:
        return self.states_gib + self.activations_gib + self.buffers_gib

    def describe(self) -> str:
        return (
            f"ZeRO-{self.stage}, offload {self.offload}, micro-batch {self.micro_batch}, "
            f"activation checkpointing {self.checkpointing}"
        )


@dataclass
class Plan:
    params: ParamCount
    global_batch: int
    candidates: list[Candidate]
    chosen: Candidate | None
    budget_gib: float
    notes: list[str] = field(default_factory=list)
    cluster: Cluster = field(default_factory=Cluster)


def offloads_for(stage: int, device: str) -> tuple[str, ...]:
    if device == "cpu" or stage == 0:
        return ("none",)
    return ("none", "optimizer", "all") if stage == 3 else ("none", "optimizer")


def micro_batches(per_rank: int) -> list[int]:
    sizes, size = [], 1
    while size < per_rank:
        sizes.append(size)
        size *= 2
    return sizes + [per_rank]


def buffer_bytes(stage: int, total_params: int, bucket: int = 50_000_000) -> int:
    """16-bit communication buckets DeepSpeed allocates (reduce + all-gather / prefetch), capped by the model."""
    if stage == 0:
        return 0
    return 2 * 2 * min(bucket, total_params)


def update_time(m, cand: Candidate, params: ParamCount, cluster: Cluster, src_len: int, tgt_len: int) -> float:
    world, total = cluster.world_size, params.total
    tokens = cand.micro_batch * src_len
    efficiency = tokens / (tokens + HALF_EFFICIENCY_TOKENS)
    flops = training_flops(m, cand.micro_batch, src_len, tgt_len)
    if cand.checkpointing != "off":
        flops *= CHECKPOINT_RECOMPUTE
    compute = cand.update_freq * flops / (GPU_TFLOPS * 1e12 * efficiency)
    bandwidth = (INTER_NODE_GBPS if cluster.nodes > 1 else INTRA_NODE_GBPS) * 1e9
    grad_bytes = 2 * total
    if world == 1:
        comm = 0.0
    elif cand.stage <= 1:
        comm = 2 * grad_bytes / bandwidth
    elif cand.stage == 2:
        comm = (cand.update_freq + 1) * grad_bytes / bandwidth
    else:
        comm = cand.update_freq * 3 * grad_bytes / bandwidth
    offload = 0.0
    if cand.offload != "none":
        share = total / world
        offload += 2 * 2 * share / (PCIE_GBPS * 1e9)  # grads down, params up
        offload += share * cluster.gpus_per_node / CPU_ADAM_PARAMS_PER_S  # ranks share the node's CPUs
    if cand.offload == "all":
        offload += cand.update_freq * 2 * 2 * total / (PCIE_GBPS * 1e9)  # fetched in fwd and bwd
    return compute + comm + offload


def make_plan(
    m,
    cluster: Cluster,
    src_len: int,
    tgt_len: int,
    global_batch: int,
    *,
    precision: str = "bf16",
    safety: float = 0.9,
    checkpointing: tuple[str, ...] = ("off", "stage", "layer"),
) -> Plan:
    """Score every candidate; ``chosen`` is the fastest that fits (None when nothing does)."""
    if precision not in ACTIVATION_BYTES:
        raise ValueError(f"precision: got {precision!r}, expected one of {', '.join(ACTIVATION_BYTES)}")
    params = count_parameters(m)
    world = cluster.world_size
    per_rank = max(1, math.ceil(global_batch / world))
    budget = safety * cluster.gpu_mem_gib
    cpu_budget = safety * cluster.cpu_mem_gib
    candidates = []
    for stage in (0, 1, 2, 3):
        for offload in offloads_for(stage, cluster.device):
            states = model_states(params, stage, offload, cluster.nodes, cluster.gpus_per_node)
            if precision == "fp32" and offload == "none":
                # fp32 training has no 16-bit copies: 4 (params) + 4 (grads) + 8 (Adam) bytes per parameter
                states = _fp32_states(params.total, stage, world)
            for ckpt in checkpointing:
                for micro in micro_batches(per_rank):
                    acts = activation_bytes(m, micro, src_len, tgt_len, precision=precision, checkpointing=ckpt)
                    cand = Candidate(
                        stage,
                        offload,
                        ckpt,
                        micro,
                        math.ceil(per_rank / micro),
                        states.gpu_bytes / GIB,
                        acts.peak_bytes / GIB,
                        buffer_bytes(stage, params.total) / GIB,
                        states.cpu_bytes_per_node / GIB,
                    )
                    cand.time = update_time(m, cand, params, cluster, src_len, tgt_len)
                    if cand.gpu_gib > budget:
                        cand.why_not = f"needs {cand.gpu_gib:.2f} GiB > {budget:.2f} GiB per {cluster.rank_name}"
                    elif offload != "none" and cand.cpu_gib_per_node > cpu_budget:
                        cand.why_not = f"needs {cand.cpu_gib_per_node:.1f} GiB CPU per node > {cpu_budget:.1f}"
                    else:
                        cand.fits = True
                    candidates.append(cand)
    fitting = [c for c in candidates if c.fits]
    # fastest; ties go to less offload, lower stage, less recompute, bigger micro-batch
    order = {"none": 0, "optimizer": 1, "all": 2, "off": 0, "stage": 1, "layer": 2}
    chosen = min(
        fitting,
        key=lambda c: (round(c.time, 9), order[c.offload], c.stage, order[c.checkpointing], -c.micro_batch),
        default=None,
    )
    return Plan(params, global_batch, candidates, chosen, budget, cluster=cluster)


def _fp32_states(total: int, stage: int, world: int):
    from .memory import ModelStates

    partitioned = {0: 0, 1: 8, 2: 12, 3: 16}[stage]
    return ModelStates(int(16 * total - partitioned * total + partitioned * total / world), int(4 * total))


def smallest_need(plan: Plan) -> Candidate:
    return min(plan.candidates, key=lambda c: c.gpu_gib)


def nothing_fits_message(plan: Plan, cluster: Cluster) -> str:
    best = smallest_need(plan)
    more = "GPUs" if cluster.device == "gpu" else "CPU processes (--gpus-per-node)"
    return (
        f"nothing fits: smallest need is {best.gpu_gib:.2f} GiB per {cluster.rank_name} with {best.describe()} "
        f"(budget {plan.budget_gib:.2f} GiB = safety x {cluster.gpu_mem_gib:g} GiB); use more {more}, "
        f"a shorter --src-len, a more aggressive --pooling-schedule or a smaller model"
    )


def table(plan: Plan, all_rows: bool = False) -> str:
    """One line per (stage, offload, checkpointing, micro-batch); by default the best micro-batch per
    (stage, offload, checkpointing) that fits plus the smallest one that does not."""
    best_time = plan.chosen.time if plan.chosen else min(c.time for c in plan.candidates)
    rows = plan.candidates
    if not all_rows:
        keep = []
        groups: dict[tuple, list[Candidate]] = {}
        for c in rows:
            groups.setdefault((c.stage, c.offload, c.checkpointing), []).append(c)
        for group in groups.values():
            fitting = [c for c in group if c.fits]
            if fitting:
                keep.append(min(fitting, key=lambda c: c.time))
            failing = [c for c in group if not c.fits]
            if failing:
                keep.append(min(failing, key=lambda c: c.micro_batch))
        rows = keep
    # per rank: GPU memory, or with --device cpu one CPU process's RAM (no offload column: nothing to offload to)
    gpu = plan.cluster.device == "gpu"
    memory = f"{plan.cluster.memory_name} GiB"
    header = (
        f"{'stage':>5} {'offload':>9} {'ckpt':>5} {'micro':>5} {'accum':>5} {'states':>8} {'activ':>8} "
        f"{'buffers':>8} {memory:>8}" + (f" {'CPU GiB':>8}" if gpu else "") + f" {'time':>6}  fits"
    )
    lines = [header, "-" * len(header)]
    for c in rows:
        mark = "*" if c is plan.chosen else ""
        lines.append(
            f"{c.stage:>5} {c.offload:>9} {c.checkpointing:>5} {c.micro_batch:>5} {c.update_freq:>5} "
            f"{c.states_gib:8.2f} {c.activations_gib:8.2f} {c.buffers_gib:8.2f} {c.gpu_gib:8.2f} "
            + (f"{c.cpu_gib_per_node:8.1f} " if gpu else "")
            + f"{c.time / best_time:6.2f}  {'yes' if c.fits else 'no'}{mark}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------


def _template(stage: int, offload: str, precision: str, device: str) -> dict:
    if device == "cpu":
        name = "zero3_cpu" if stage == 3 else "zero2_cpu"
    elif stage == 3:
        name = {"none": "zero3_bf16", "optimizer": "zero3_offload_optimizer", "all": "zero3_offload_all"}[offload]
        if precision == "fp16" and offload == "none":
            name = "zero3_fp16"
    else:
        name = f"zero{stage}_bf16" if not (precision == "fp16" and stage == 2) else "zero2_fp16"
    from ..engine import read_ds_config

    return read_ds_config(name)  # a shipped name: found in any install, from any directory


def ds_config_for(cand: Candidate, precision: str, world_size: int, device: str = "gpu") -> dict:
    """A ready DeepSpeed JSON: the shipped file for the stage/offload, batch fields filled in."""
    ds = copy.deepcopy(_template(cand.stage, cand.offload, precision, device))
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cand.stage
    if cand.stage < 2:
        for key in ("reduce_scatter", "allgather_bucket_size", "overlap_comm") if cand.stage == 0 else ():
            zero.pop(key, None)
    if cand.offload == "optimizer" and cand.stage in (1, 2):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds["bf16"] = {"enabled": precision == "bf16"}
    fp16 = ds.get("fp16") if isinstance(ds.get("fp16"), dict) else {}
    ds["fp16"] = {**fp16, "enabled": precision == "fp16"} if precision == "fp16" else {"enabled": False}
    ds["train_micro_batch_size_per_gpu"] = cand.micro_batch
    ds["gradient_accumulation_steps"] = cand.update_freq
    ds["train_batch_size"] = cand.micro_batch * cand.update_freq * world_size
    return ds


def trainer_overrides(cand: Candidate, m, src_len: int, tgt_len: int, precision: str, ds_path: str) -> dict:
    """The trainer config keys that go with the JSON (nested, as in a run YAML)."""
    return {
        "model": {
            "preset": m.preset,
            "variant": m.variant,
            "pooling_schedule": m.pooling_schedule,
            "max_source_positions": src_len,
            "max_target_positions": tgt_len,
        },
        "data": {"max_sentences": cand.micro_batch, "max_tokens": cand.micro_batch * src_len},
        "train": {
            "update_freq": cand.update_freq,
            "activation_checkpointing": cand.checkpointing,
            "precision": precision,
            "deepspeed_config": ds_path,
        },
    }


def override_flags(overrides: dict) -> list[str]:
    """The same overrides as ``--section.key VALUE`` flags (for pyramidion-train; values as YAML reads them)."""
    flags = []
    for section, values in overrides.items():
        for key, value in values.items():
            if value is None:
                continue
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            read = yaml.safe_load(text)
            # a bare off/on reads as a boolean, which the config turns back into the word its choices use;
            # any other string YAML would misread (a number, null) is quoted
            if isinstance(value, str) and read != value and not isinstance(read, bool):
                text = f"'{value}'"
            flags += [f"--{section}.{key}", text]
    return flags


def plan_summary(plan: Plan) -> dict:
    return {
        "params": asdict(plan.params),
        "global_batch": plan.global_batch,
        "budget_gib": plan.budget_gib,
        "chosen": asdict(plan.chosen) if plan.chosen else None,
    }
