"""pyramidion-bench train: training throughput, MFU and memory per variant and ZeRO stage.

Two parts, both printing JSON:

* throughput (default): for each variant x ZeRO stage, a real DeepSpeed engine (world of 1, in this
  process) trains on random tokens; reports tokens/s, achieved TFLOP/s, MFU (FLOPs of the model actually
  run, from ``flops_per_step``) and peak memory. The ``vanilla`` variant measured in the same run is the
  baseline: ``speedup_vs_vanilla`` and ``speedup_vs_blockwise`` per row (same stage, length, settings).
  The variants' steps are interleaved (A B, B A, ...): a step time is the median of ``--steps``, a
  speed-up the median of the ratios of steps measured back to back, each with its quartiles; a figure
  whose interquartile range exceeds 10% of its median (``SPREAD_LIMIT``) is flagged as not to be trusted.
  Several ``--src-len`` run in one process (DeepSpeed's ops build once); ``--tokens`` keeps the tokens
  per step fixed across lengths. A row that fails (out of memory, ...) records its error and the rest go on.
* ``--zero3-memory``: ZeRO-3 parameter + optimizer-state bytes held by each rank with 1 and with 2 ranks
  (two runs of the real DeepSpeed launcher on the CPU accelerator: partitioning does not depend on the
  device), and the ratio (target <= 0.55).

    pyramidion-bench train --preset base --src-len 8192 --tgt-len 256 --batch 4 --precision bf16
    pyramidion-bench train --zero3-memory --preset base
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .output import write_json

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("vanilla", "blockwise", "transpooler", "pyramidion")


def model_config(preset: str, variant: str, src_len: int, tgt_len: int, vocab: int, overrides: list[str]):
    from ..config import load_config

    cfg = load_config(
        None,
        [
            "--model.preset",
            preset,
            "--model.variant",
            variant,
            "--model.max_source_positions",
            str(src_len),
            "--model.max_target_positions",
            str(tgt_len),
            "--model.vocab_size",
            str(vocab),
            "--model.dropout",
            "0.0",
            *overrides,
        ],
    )
    return cfg


def ds_config_for(cfg, stage: int, precision: str) -> dict:
    from ..engine import read_ds_config, resolve_ds_config, shipped_ds_configs

    shipped = shipped_ds_configs()
    name = f"zero{stage}_cpu" if precision == "fp32" else f"zero{stage}_{precision}"
    if name not in shipped:  # stage 0/1 have no CPU file: the bf16 file with precision following the trainer
        path = shipped[f"zero{stage}_bf16"]
        raw = read_ds_config(path)
        raw["bf16"] = {"enabled": "auto"}
    else:
        path = shipped[name]
        raw = read_ds_config(path)
    cfg.train.precision = precision
    return resolve_ds_config(raw, cfg, world_size=1, source=path.name)


def batch_for(args, src_len: int) -> int:
    """Examples per step: ``--tokens`` source tokens per step when given, else ``--batch``."""
    return max(1, args.tokens // src_len) if args.tokens else args.batch


#: a figure is trustworthy when the interquartile range of its step times (or of its pair ratios) is at
#: most this share of their median; above it the machine was too busy (or the run too short) to tell
SPREAD_LIMIT = 0.10


def spread(values: list[float]) -> dict:
    """Median, quartiles, extremes and the relative spread (IQR / median) of ``values`` (a pure function:
    the step times of one variant, or the per-pair ratios of two)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("spread() of no values")

    def quantile(q: float) -> float:  # linear interpolation between order statistics (numpy's default)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    median, q25, q75 = quantile(0.5), quantile(0.25), quantile(0.75)
    relative = (q75 - q25) / median if median else float("inf")
    return {
        "median": median,
        "iqr": [q25, q75],
        "range": [ordered[0], ordered[-1]],
        "n": len(ordered),
        "relative_iqr": relative,
        "trustworthy": len(ordered) >= 4 and relative <= SPREAD_LIMIT,
    }


def pair_ratios(base_times: list[float], times: list[float]) -> list[float]:
    """Speed-up of a variant over a baseline per interleaved pair: step k of one against step k of the
    other, measured back to back, so load that comes and goes hits both sides of most pairs alike."""
    if len(base_times) != len(times):
        raise ValueError(f"pairs need as many steps on each side, got {len(base_times)} and {len(times)}")
    return [base / mine for base, mine in zip(base_times, times, strict=True)]


class VariantRun:
    """One variant's DeepSpeed engine training on random tokens: ``step()`` is one timed training step,
    ``row(times)`` the figures for the times measured."""

    def __init__(self, args, variant: str, stage: int, overflow_check: bool, src_len: int):
        from ..engine import build_engine, build_model, label_smoothed_nll_loss

        self.args, self.variant, self.stage, self.overflow_check, self.src_len = (
            args,
            variant,
            stage,
            overflow_check,
            src_len,
        )
        self.batch = batch = batch_for(args, src_len)
        cfg = model_config(args.preset, variant, src_len, args.tgt_len, args.vocab, args.override)
        cfg.train.activation_checkpointing = args.checkpointing
        cfg.train.compile = args.compile
        cfg.train.compile_mode = args.compile_mode
        cfg.data.max_sentences = batch
        ds = ds_config_for(cfg, stage, args.precision)
        # the shipped bf16 JSONs turn DeepSpeed's per-gradient overflow scan off (the trainer checks once per
        # update instead, engine.nonfinite); "on" measures what the scan costs
        if ds["bf16"].get("enabled"):
            ds["bf16"]["check_grad_overflow"] = overflow_check
        self.cuda = torch.cuda.is_available()
        resident_before = torch.cuda.memory_allocated() if self.cuda else 0
        torch.manual_seed(0)
        self.bundle = build_engine(cfg, ds, build_model(cfg, ds))
        engine, model = self.bundle.engine, self.bundle.model
        device = engine.device
        self.cuda = device.type == "cuda"
        m = cfg.model
        src = torch.randint(4, m.vocab_size, (batch, src_len), device=device)
        tgt = torch.randint(4, m.vocab_size, (batch, args.tgt_len), device=device)
        prev = torch.cat([torch.full_like(tgt[:, :1], m.bos_id), tgt[:, :-1]], dim=1)
        lengths = torch.full((batch,), src_len, device=device)

        def train_step():
            # every source is src_len long: padded=False lets a compiled step run unmasked SDPA, as eager does
            logits = engine(src, lengths, prev, padded=False)
            loss, _ = label_smoothed_nll_loss(logits, tgt, 0.1, m.pad_id)
            engine.backward(loss / tgt.numel())
            engine.step()

        self.train_step = train_step
        self.flops = model.flops_per_step(batch, src_len, args.tgt_len)
        for _ in range(args.warmup):
            train_step()
        # with several engines alive, a variant's peak = what its engine holds + what its step adds on top
        self.resident = torch.cuda.memory_allocated() - resident_before if self.cuda else 0
        self.transient = 0

    def step(self) -> float:
        """One training step; its seconds (the device synchronized on both ends)."""
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self.train_step()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if self.cuda:
            self.transient = max(self.transient, torch.cuda.max_memory_allocated() - before)
        return seconds

    def profile(self, top_n: int) -> dict:
        """Where one step's time goes: the busiest operators on host and device."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with torch_profile(activities=activities) as prof:
            self.train_step()
            if self.cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        device_key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, device_key, 0), reverse=True)[:top_n]
        return {
            "host_top": [
                (e.key, round(e.self_cpu_time_total / 1e3, 2), e.count)
                for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top_n]
            ],
            "device_top": [(e.key, round(getattr(e, device_key, 0) / 1e3, 2), e.count) for e in top],
            "device_total_ms": round(sum(getattr(e, device_key, 0) for e in events) / 1e3, 2),
            "kernel_launches": sum(e.count for e in events if e.key.startswith("cuda") and "Launch" in e.key),
        }

    def row(self, times: list[float], interleaved: bool) -> dict:
        args, batch, src_len = self.args, self.batch, self.src_len
        stats = spread(times)
        seconds = stats["median"]
        row = {
            "variant": self.variant,
            "zero_stage": self.stage,
            "src_len": src_len,
            "batch": batch,
            "precision": self.bundle.precision,
            "compile": args.compile and args.compile_mode,
            "overflow_check": self.overflow_check,
            "checkpointing": args.checkpointing,
            "interleaved": interleaved,
            "step_s": seconds,  # the median step
            "step_s_spread": stats,
            "step_times_s": [round(t, 6) for t in times],
            "trustworthy": stats["trustworthy"],
            "tokens_per_s": batch * (src_len + args.tgt_len) / seconds,
            "source_tokens_per_s": batch * src_len / seconds,
            "tflops_per_s": self.flops / seconds / 1e12,
            "flops_per_step": self.flops,
        }
        if self.cuda:
            row["peak_mem_gib"] = (self.resident + self.transient) / 2**30
            row["mfu"] = self.flops / seconds / (args.peak_tflops * 1e12)
        else:
            import resource

            row["process_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return row

    def close(self) -> None:
        engine = self.bundle.engine
        if hasattr(engine, "destroy"):
            engine.destroy()
        self.bundle = self.train_step = None  # drop the references before collecting
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def interleaved_times(runs: list, steps: int, block: int = 1) -> list[list[float]]:
    """Per run, ``steps`` step times measured in turns of ``block`` steps: A B C, then C B A, then
    A B C... (reversing the order each round cancels a steady drift). Step k of every run falls in the
    same round, which is what :func:`pair_ratios` pairs."""
    times: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    done = 0
    while done < steps:
        turn = min(block, steps - done)
        for i in order:
            for _ in range(turn):
                times[i].append(runs[i].step())
        order.reverse()
        done += turn
    return times


def measure_throughput(args, variant: str, stage: int, overflow_check: bool = True, src_len: int | None = None) -> dict:
    """One variant alone: warm-up, ``args.steps`` timed steps, optionally a profiled one."""
    return measure_group(args, [variant], stage, overflow_check, src_len or args.src_len[0], interleave=False)[0]


def measure_group(args, variants, stage: int, overflow_check: bool, src_len: int, interleave: bool) -> list[dict]:
    """Rows of the variants measured together: every engine built and warmed up, then their steps
    interleaved (``interleave``) or one variant after the other. A variant that fails to build (out of
    memory, ...) gets a row with its error and the rest go on."""
    runs, rows = [], {}
    try:
        for variant in variants:
            try:
                runs.append(VariantRun(args, variant, stage, overflow_check, src_len))
            except Exception as err:  # e.g. out of memory: record it and measure the rest
                rows[variant] = error_row(args, variant, stage, overflow_check, src_len, err)
        if interleave:
            times = interleaved_times(runs, args.steps, args.block)
        else:
            times = [[run.step() for _ in range(args.steps)] for run in runs]
        for run, run_times in zip(runs, times, strict=True):
            rows[run.variant] = run.row(run_times, interleave and len(runs) > 1)
            if args.profile:
                rows[run.variant]["profile_ms"] = run.profile(args.profile)
    except Exception as err:
        for run in runs:
            rows[run.variant] = error_row(args, run.variant, stage, overflow_check, src_len, err)
    finally:
        for run in runs:
            run.close()
    return [rows[variant] for variant in variants]


def error_row(args, variant, stage, overflow_check, src_len, err) -> dict:
    message = str(err).splitlines()[0] if str(err) else ""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "variant": variant,
        "zero_stage": stage,
        "src_len": src_len,
        "overflow_check": overflow_check,
        "compile": args.compile and args.compile_mode,
        "error": f"{type(err).__name__}: {message}"[:300],
    }


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_vanilla / _blockwise against the row of that variant with the same stage, length and
    settings: the median of the per-pair ratios when both were interleaved (with their spread in
    ``speedup_vs_*_spread``), else the ratio of the median steps; speedup_vs_overflow_check for rows
    measured without DeepSpeed's overflow scan."""

    def key(row):
        return row["zero_stage"], row["src_len"], row["compile"]

    def speedup(row, ref, name):
        if row["interleaved"] and ref["interleaved"] and ref is not row:
            stats = spread(pair_ratios(ref["step_times_s"], row["step_times_s"]))
            row[name] = stats["median"]
            row[f"{name}_spread"] = stats
        else:
            row[name] = row["tokens_per_s"] / ref["tokens_per_s"]

    done = [r for r in rows if "error" not in r]
    for row in done:
        same = [r for r in done if key(r) == key(row)]
        for base in ("vanilla", "blockwise"):
            ref = next((r for r in same if r["variant"] == base and r["overflow_check"] == row["overflow_check"]), None)
            if ref is not None:
                speedup(row, ref, f"speedup_vs_{base}")
        if not row["overflow_check"]:
            ref = next((r for r in same if r["variant"] == row["variant"] and r["overflow_check"]), None)
            if ref is not None:
                row["speedup_vs_overflow_check"] = row["tokens_per_s"] / ref["tokens_per_s"]


def _spreads(row: dict) -> list[tuple[str, dict]]:
    """(what, spread) of a row's figures: its step time, then each speed-up measured in pairs."""
    return [("step time", row["step_s_spread"])] + [
        (name.removesuffix("_spread").replace("_", " "), row[name])
        for name in sorted(row)
        if name.startswith("speedup_vs_") and name.endswith("_spread")
    ]


def untrustworthy(rows: list[dict]) -> list[str]:
    """One line per figure whose spread exceeds :data:`SPREAD_LIMIT` (or that has fewer than 4 values);
    sets each row's ``trustworthy`` to whether all of its figures hold."""
    lines = []
    for row in rows:
        if "error" in row:
            continue
        where = f"{row['variant']} zero{row['zero_stage']} src_len {row['src_len']}"
        row["trustworthy"] = True
        for what, stats in _spreads(row):
            if not stats["trustworthy"]:
                row["trustworthy"] = False
                lines.append(
                    f"{where}: {what} spread too large to trust: IQR {100 * stats['relative_iqr']:.0f}% of the "
                    f"median over {stats['n']} (limit {100 * SPREAD_LIMIT:.0f}%, at least 4)"
                )
    return lines


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per row: the median step, its quartiles, and the speed-ups with theirs."""
    lines = []
    for row in rows:
        where = f"{row['variant']} zero{row['zero_stage']} src_len {row['src_len']}"
        if "error" in row:
            lines.append(f"{where}: {row['error']}")
            continue
        parts = []
        for what, stats in _spreads(row):
            low, high = stats["iqr"]
            if what == "step time":
                parts.append(f"step {stats['median']:.4g} s (IQR {low:.4g}-{high:.4g}, {stats['n']} steps)")
            else:
                parts.append(f"{stats['median']:.3f}x {what.removeprefix('speedup vs ')} (IQR {low:.3f}-{high:.3f})")
        lines.append(f"{where}: " + ", ".join(parts) + ("" if row["trustworthy"] else " [spread too large to trust]"))
    return lines


def throughput(args, report=None) -> dict:
    """Every (length, stage, overflow setting) group of variants, interleaved; ``report(result)`` after
    each group, so a run cut short by a time limit still leaves what it measured."""
    from ..distributed import init_distributed

    init_distributed()
    checks = {"on": [True], "off": [False], "both": [True, False]}[args.overflow_check]
    if args.precision != "bf16":
        checks = [True]  # fp16 always checks (loss scaling); fp32 never does
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {
        "benchmark": "train",
        "device": device,
        "preset": args.preset,
        "src_len": args.src_len,
        "tgt_len": args.tgt_len,
        "tokens_per_step": args.tokens or None,
        "vocab": args.vocab,
        "peak_tflops": args.peak_tflops,
        "steps": args.steps,
        "interleave": args.interleave,
        "block": args.block,
        "spread_limit": SPREAD_LIMIT,
        "rows": [],
    }
    for src_len in args.src_len:
        for stage in args.stages:
            for check in checks:
                groups = [args.variants] if args.interleave else [[v] for v in args.variants]
                for group in groups:
                    result["rows"] += measure_group(args, group, stage, check, src_len, args.interleave)
                    add_speedups(result["rows"])
                    result["untrustworthy"] = untrustworthy(result["rows"])
                    result["trustworthy"] = not result["untrustworthy"]
                    if report is not None:
                        report(result)
    return result


# --------------------------------------------------------------------------------------------------
# ZeRO-3 state memory per rank
# --------------------------------------------------------------------------------------------------


def _state_bytes(engine) -> dict:
    """Bytes of parameter partitions and optimizer state this rank holds (each storage counted once)."""
    seen, totals = set(), {"params": 0, "optimizer": 0}

    def add(kind, tensor):
        if not torch.is_tensor(tensor) or tensor.numel() == 0:
            return
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            return
        seen.add(key)
        totals[kind] += tensor.untyped_storage().nbytes()

    for param in engine.module.parameters():
        add("params", getattr(param, "ds_tensor", param))
    optimizer = engine.optimizer
    for flat in getattr(optimizer, "fp32_partitioned_groups_flat", []):
        add("optimizer", flat)
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        for value in state.values():
            add("optimizer", value)
    return totals


def zero3_worker(out: str, preset: str, vocab: int) -> None:
    """Run under the DeepSpeed launcher: one ZeRO-3 step, then each rank's state bytes to ``out``."""
    import torch.distributed as dist

    from ..distributed import init_distributed
    from ..engine import build_engine, build_model, label_smoothed_nll_loss

    world = init_distributed()
    cfg = model_config(preset, "pyramidion", 256, 16, vocab, [])
    ds = ds_config_for(cfg, 3, "fp32")
    ds["train_batch_size"] = world.world_size  # one example per rank
    bundle = build_engine(cfg, ds, build_model(cfg, ds))
    engine = bundle.engine
    src = torch.randint(4, vocab, (1, 256))
    tgt = torch.randint(4, vocab, (1, 16))
    logits = engine(src, torch.tensor([256]), tgt)
    loss, _ = label_smoothed_nll_loss(logits, tgt, 0.0, cfg.model.pad_id)
    engine.backward(loss)
    engine.step()
    rows = [None] * world.world_size
    dist.all_gather_object(rows, _state_bytes(engine))
    if world.rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_memory(args) -> dict:
    results = {}
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    deepspeed = Path(sys.executable).parent / "deepspeed"
    with tempfile.TemporaryDirectory() as tmp:
        for world_size in (1, 2):
            out = Path(tmp) / f"w{world_size}.json"
            cmd = [
                str(deepspeed) if deepspeed.exists() else "deepspeed",
                "--num_gpus",
                str(world_size),
                "--master_port",
                str(_free_port()),
                "--module",
                "pyramidion_ds.bench.train",
                "--zero3-worker",
                str(out),
                "--preset",
                args.preset,
                "--vocab",
                str(args.vocab),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"zero3 worker with {world_size} ranks failed:\n{proc.stderr[-3000:]}")
            results[world_size] = json.loads(out.read_text())
    one = results[1][0]["params"] + results[1][0]["optimizer"]
    per_rank = [r["params"] + r["optimizer"] for r in results[2]]
    return {
        "benchmark": "zero3_memory",
        "preset": args.preset,
        "vocab": args.vocab,
        "one_rank_bytes": one,
        "two_ranks_bytes_per_rank": per_rank,
        "ratio_max_rank": max(per_rank) / one,
        "target_ratio": 0.55,
        "meets_target": max(per_rank) / one <= 0.55,
        "detail": results,
    }


def build_parser():
    p = argparse.ArgumentParser(
        prog="pyramidion-bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="debug", help="model size preset (debug, base, large)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--stages", nargs="+", type=int, default=[2], help="ZeRO stages to measure")
    p.add_argument("--src-len", type=int, nargs="+", default=[512], help="source lengths (one process)")
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument(
        "--tokens",
        type=int,
        default=0,
        help="source tokens per step; the batch is tokens // src-len for every length (overrides --batch)",
    )
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="timed steps per variant; their median is the step time, their spread says whether to trust it "
        "(default: %(default)s)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default: %(default)s)")
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the variants in turns (A B, B A, ...) with every engine alive, so the speed-ups come from "
        "pairs of steps measured back to back; --no-interleave measures one variant after the other, "
        "one engine at a time (less memory) (default: on)",
    )
    p.add_argument("--block", type=int, default=1, help="steps per variant per turn (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--checkpointing", default="off", choices=("off", "stage", "layer"))
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile one step and report the N busiest operators (host and device)",
    )
    p.add_argument("--compile", action="store_true", help="engine.compile() (torch.compile) the model")
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)",
    )
    p.add_argument(
        "--overflow-check",
        default="on",
        choices=("on", "off", "both"),
        help="bf16 with ZeRO 1/2: DeepSpeed's per-gradient overflow check (bf16.check_grad_overflow); "
        "'both' measures each variant with and without it",
    )
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 bf16 dense: 989)")
    p.epilog = (
        "Any --section.key VALUE (as pyramidion-train takes) changes the measured model, e.g. "
        "--model.chunk_size 256 --model.pooling_schedule [4096,2048,1024,512]"
    )
    p.add_argument("--zero3-memory", action="store_true", help="measure ZeRO-3 state bytes per rank, 1 vs 2 ranks")
    p.add_argument("--zero3-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=None, help="also write the JSON here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    stray = [arg for arg in overrides if arg.startswith("-") and "." not in arg.split("=")[0]]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.override = overrides  # config overrides: checked by the config loader, one line on a typo
    if args.zero3_worker:
        zero3_worker(args.zero3_worker, args.preset, args.vocab)
        return 0

    def write(result):  # after every row: a file that parses whenever the run stops (see .output)
        if args.output:
            write_json(args.output, result)

    if args.steps < 1 or args.block < 1:
        parser.error(f"--steps and --block: got {args.steps} and {args.block}, expected integers >= 1")
    result = zero3_memory(args) if args.zero3_memory else throughput(args, report=write)
    write(result)
    print(json.dumps(result, indent=2))
    if "rows" in result:  # after the JSON, on stderr: stdout stays one JSON document
        for line in summary_lines(result["rows"]) + result["untrustworthy"]:
            print(f"pyramidion-bench train: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
