"""pyramidion-tune: pick the ZeRO stage, offload, checkpointing and micro-batch that fit a cluster.

    pyramidion-tune --preset base --src-len 8192 --tgt-len 512 --nodes 2 --gpus-per-node 8 \\
        --gpu-mem-gib 80 --cpu-mem-gib 512 --global-batch-tokens 1048576 --out tuned/ [--measure --data DIR]

Writes ``OUT/ds_config.json`` (a ready DeepSpeed JSON), ``OUT/trainer_overrides.yaml`` (micro-batch,
accumulation, checkpointing, precision), ``OUT/plan.json`` and ``OUT/table.txt``; exits 1 with
"nothing fits: ..." when no configuration fits the budget. The estimates, the plan and the checks against real
runs are in ``pyramidion_ds.tune``; this module reads the flags, prints and picks the exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import EXIT_ERROR, UsageError
from .common import fail, run_main

PROG = "pyramidion-tune"
DEFAULT_VOCAB = 32000


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Estimate per-GPU memory for each ZeRO stage, offload, "
        "checkpointing and micro-batch; pick the fastest that fits; write a DeepSpeed "
        "JSON and the trainer overrides.",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--preset",
        choices=("debug", "base", "large"),
        default=None,
        help="model size preset (default: the config's, else base)",
    )
    model.add_argument("--config", default=None, help="run YAML (or shipped name) to take the model from")
    model.add_argument(
        "--variant",
        default=None,
        choices=("vanilla", "blockwise", "transpooler", "pyramidion"),
        help="encoder variant (default: the config's, else pyramidion)",
    )
    model.add_argument(
        "--pooling-schedule",
        default=None,
        help="widths per encoder layer, '[8192, 2048, ...]' or the release form '{0: 2048, 1: 512}'",
    )
    model.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"vocabulary size (default: the config's, the data's with --data, else {DEFAULT_VOCAB})",
    )
    model.add_argument("--src-len", type=int, default=None, help="source tokens (default: max_source_positions)")
    model.add_argument("--tgt-len", type=int, default=None, help="target tokens (default: max_target_positions)")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, default=1, help="machines in the job (default %(default)s)")
    cluster.add_argument(
        "--gpus-per-node",
        type=int,
        default=8,
        help="ranks per node: GPUs, or CPU processes with --device cpu (default %(default)s)",
    )
    cluster.add_argument(
        "--gpu-mem-gib",
        type=float,
        default=None,
        help="memory of one rank in GiB: one GPU's (default 80), or with --device cpu one CPU "
        "process's share of the RAM (default --cpu-mem-gib / --gpus-per-node)",
    )
    cluster.add_argument(
        "--cpu-mem-gib",
        type=float,
        default=512.0,
        help="CPU memory (RAM) per node in GiB, for offload (default %(default)s)",
    )
    cluster.add_argument(
        "--device",
        choices=("gpu", "cpu"),
        default="gpu",
        help="cpu: ranks are CPU processes (tests, laptops): CPU DeepSpeed JSONs, no offload, "
        "fp32 by default (default %(default)s)",
    )
    batch = p.add_argument_group("batch").add_mutually_exclusive_group()
    batch.add_argument("--global-batch-size", type=int, default=None, help="sequences per update")
    batch.add_argument(
        "--global-batch-tokens", type=int, default=None, help="source tokens per update (divided by --src-len)"
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="training precision: bytes of activations and weight copies, and the DeepSpeed JSON's "
        "bf16/fp16 sections (default: bf16 on GPUs, fp32 with --device cpu)",
    )
    p.add_argument("--safety", type=float, default=0.9, help="use at most this share of GPU (and CPU) memory")
    p.add_argument("--out", default="tuned", help="directory for ds_config.json, trainer_overrides.yaml, ...")
    p.add_argument("--all-rows", action="store_true", help="print every micro-batch, not the best per row")
    p.add_argument(
        "--measure",
        action="store_true",
        help="measure the chosen configuration's activation peak (one real step), and with --data "
        "run a few real updates under the DeepSpeed launcher and read their peak memory",
    )
    p.add_argument("--data", default=None, help="binarized data dir for --measure's real run")
    p.add_argument(
        "--measure-updates",
        type=int,
        default=3,
        help="updates of the real run that --measure --data makes (default %(default)s)",
    )
    return p


def parse_schedule(text: str | None):
    if text is None:
        return None
    import yaml

    stripped = text.strip()
    if stripped.startswith("{"):
        return stripped  # the release form, parsed safely by the config
    value = yaml.safe_load(stripped)
    if not isinstance(value, list):
        raise UsageError(f"--pooling-schedule: got {text!r}, expected '[w0, w1, ...]' or '{{0: 2048, 1: 512}}'")
    return value


def model_config(args):
    from ..config import load_config

    preset = args.preset or (None if args.config else "base")
    cfg = load_config(args.config, ["--model.preset", preset] if preset else [])
    m = cfg.model
    if args.variant:
        m.variant = args.variant
    schedule = parse_schedule(args.pooling_schedule)
    if schedule is not None:
        m.pooling_schedule = schedule
    if args.src_len:
        m.max_source_positions = args.src_len
    if args.tgt_len:
        m.max_target_positions = args.tgt_len
    if args.vocab_size:
        m.vocab_size = args.vocab_size
    elif args.data:
        from ..data import vocab_size

        m.vocab_size = vocab_size(args.data)
    elif not m.vocab_size:
        m.vocab_size = DEFAULT_VOCAB
    m.validate()
    return cfg, m


def global_batch(args, cluster, src_len: int) -> int:
    if args.global_batch_size:
        return args.global_batch_size
    if args.global_batch_tokens:
        return max(1, math.ceil(args.global_batch_tokens / src_len))
    return cluster.world_size


def measure(args, cfg, m, plan, cluster, out: Path, overrides: dict) -> dict:
    """--measure: print the chosen configuration's measured activations (and with --data a real run's peak)."""
    from ..tune.trials import measure_activations, prepare_trial, run_trial

    chosen = plan.chosen
    got = measure_activations(m, chosen, args.precision, cluster.device)
    report = {
        "activations_estimate_gib": chosen.activations_gib,
        "activations_measured_gib": got.peak_bytes / 2**30,
        "activations_device": f"{got.device} {got.dtype}",
    }
    print(
        f"activations, one step of micro-batch {chosen.micro_batch} ({got.device}, {got.dtype}): "
        f"estimate {chosen.activations_gib:.3f} GiB, measured {got.peak_bytes / 2**30:.3f} GiB "
        f"({chosen.activations_gib / max(got.peak_bytes / 2**30, 1e-12):.2f}x)"
    )
    if not args.data:
        print("(give --data DIR to also run a few real updates under the DeepSpeed launcher)")
        return report
    trial = prepare_trial(cfg, m, overrides, args.data, args.measure_updates, out, cluster.gpus_per_node)
    print("running:", " ".join(trial.command))
    result = run_trial(trial)
    if not result.ok:
        raise UsageError(
            f"the measuring run failed (exit {result.returncode}); see {trial.log_path} "
            f"and: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}"
        )
    peak = max(result.peaks_gib)
    what = "max allocated (CUDA)" if got.device == "cuda" else "max RSS of rank 0 (CPU: includes the runtime)"
    report.update(
        run_updates=args.measure_updates, run_peak_gib=peak, run_peak_kind=what, estimate_total_gib=chosen.gpu_gib
    )
    print(
        f"real run, {args.measure_updates} updates on {cluster.gpus_per_node} ranks: peak {peak:.3f} GiB "
        f"[{what}] vs estimated {chosen.gpu_gib:.3f} GiB per {cluster.rank_name}"
    )
    return report


def _shell(word: str) -> str:
    import shlex

    return f'"{word}"' if "'" in word and '"' not in word and "$" not in word else shlex.quote(word)


def main(argv: list[str] | None = None):
    def body():
        # --help and usage errors come before torch and deepspeed are imported (tune.plan imports the model)
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        for name in ("nodes", "gpus_per_node"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected >= 1")
        if not 0 < args.safety <= 1:
            raise UsageError(f"--safety: got {args.safety}, expected a share in (0, 1]")
        if args.gpu_mem_gib is not None and args.gpu_mem_gib <= 0:
            raise UsageError(f"--gpu-mem-gib: got {args.gpu_mem_gib:g}, expected > 0")
        cpu = args.device == "cpu"
        if args.precision is None:
            args.precision = "fp32" if cpu else "bf16"
        if args.gpu_mem_gib is None:
            args.gpu_mem_gib = args.cpu_mem_gib / args.gpus_per_node if cpu else 80.0
        if cpu:
            from ..distributed.env import use_cpu_accelerator

            use_cpu_accelerator()  # before deepspeed is imported: no "unable to detect" GPU warning
        cfg, m = model_config(args)
        import yaml

        from ..logs import quiet_deepspeed_accelerator_probe
        from ..tune.plan import (
            Cluster,
            ds_config_for,
            make_plan,
            nothing_fits_message,
            override_flags,
            plan_summary,
            table,
            trainer_overrides,
        )
        from ..tune.trials import check_outputs

        # planning for GPUs on a machine without one: DeepSpeed (imported to check the JSON) would warn that
        # it found no GPU; the plan does not depend on this machine's accelerator
        quiet_deepspeed_accelerator_probe()
        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_mem_gib, args.cpu_mem_gib, args.device)
        src, tgt = m.max_source_positions, m.max_target_positions
        batch = global_batch(args, cluster, src)
        plan = make_plan(m, cluster, src, tgt, batch, precision=args.precision, safety=args.safety)
        print(
            f"model: {m.preset} {m.variant}, {plan.params.total / 1e6:.1f}M parameters, encoder widths "
            f"{m.encoder_widths()}, source {src} / target {tgt} tokens, vocab {m.vocab_size}"
        )
        if cpu:
            print(
                f"cluster: {cluster.nodes} node(s) x {cluster.gpus_per_node} CPU processes, {cluster.gpu_mem_gib:g} "
                f"GiB RAM each (budget {plan.budget_gib:.2f} GiB); global batch {batch} sequences; {args.precision}"
            )
        else:
            print(
                f"cluster: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs, {cluster.gpu_mem_gib:g} GiB each "
                f"(budget {plan.budget_gib:.2f} GiB), {cluster.cpu_mem_gib:g} GiB CPU per node; global batch "
                f"{batch} sequences; {args.precision}"
            )
        text = table(plan, all_rows=args.all_rows)
        print(text)
        if plan.chosen is None:
            fail(PROG, nothing_fits_message(plan, cluster), EXIT_ERROR)
        chosen = plan.chosen
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ds_path = out / "ds_config.json"
        ds = ds_config_for(chosen, args.precision, cluster.world_size, cluster.device)
        overrides = trainer_overrides(chosen, m, src, tgt, args.precision, str(ds_path))
        check_outputs(ds, overrides, cluster.world_size, args.config)
        ds_path.write_text(json.dumps(ds, indent=2) + "\n")
        (out / "trainer_overrides.yaml").write_text(yaml.safe_dump(overrides, sort_keys=False))
        (out / "table.txt").write_text(text + "\n")
        summary = plan_summary(plan)
        actual = chosen.micro_batch * chosen.update_freq * cluster.world_size
        print(
            f"\nchosen: {chosen.describe()}, accumulation {chosen.update_freq} -> global batch {actual} "
            f"sequences; {chosen.gpu_gib:.2f} GiB per {cluster.rank_name} of {plan.budget_gib:.2f}"
        )
        print(f"wrote {ds_path}, {out / 'trainer_overrides.yaml'}")
        print("train with: pyramidion-train CONFIG " + " ".join(_shell(f) for f in override_flags(overrides)))
        if args.measure:
            summary["measure"] = measure(args, cfg, m, plan, cluster, out, overrides)
        (out / "plan.json").write_text(json.dumps(summary, indent=2) + "\n")
        return 0

    run_main(PROG, body)


if __name__ == "__main__":
    main()
