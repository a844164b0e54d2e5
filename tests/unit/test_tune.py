"""pyramidion-tune: parameter counts, model states, the activation model against real steps, the CLI."""

import json

import pytest

from pyramidion_ds.config import ModelConfig, load_config
from pyramidion_ds.tune.memory import activation_bytes, count_parameters, model_states
from pyramidion_ds.tune.plan import Cluster, make_plan

SCHEDULES = [None, [512, 512, 512], [128, 64, 32], "{0: 256}"]


@pytest.mark.parametrize("preset", ["debug", "base"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_parameter_count_matches_the_model(preset, positions):
    from deepspeed.runtime.zero.stage3 import model_to_params

    from pyramidion_ds.model import PyramidionModel

    m = ModelConfig(preset=preset, vocab_size=1000, positions=positions)
    total, largest = model_to_params(PyramidionModel(m))
    assert count_parameters(m).total == total
    assert count_parameters(m).largest_layer == largest


def test_model_states_shrink_with_stage_and_offload():
    params = count_parameters(ModelConfig(preset="large", vocab_size=32000))
    gpu = {
        (s, o): model_states(params, s, o, 2, 8).gpu_bytes
        for s, o in [
            (0, "none"),
            (1, "none"),
            (2, "none"),
            (3, "none"),
            (1, "optimizer"),
            (2, "optimizer"),
            (3, "optimizer"),
            (3, "all"),
        ]
    }
    assert gpu[0, "none"] > gpu[1, "none"] > gpu[2, "none"]
    assert gpu[2, "none"] > gpu[3, "none"] or gpu[3, "none"] - gpu[2, "none"] < 0.02 * gpu[2, "none"]
    assert gpu[1, "none"] > gpu[1, "optimizer"]
    assert gpu[2, "none"] > gpu[2, "optimizer"]
    assert gpu[3, "none"] > gpu[3, "optimizer"] > gpu[3, "all"]
    assert model_states(params, 0, "none", 1, 1).gpu_bytes == 16 * params.total
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        model_states(params, 2, "all", 1, 8)


def test_stage3_uses_deepspeeds_estimator():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params = count_parameters(ModelConfig(preset="base", vocab_size=32000))
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        params.total, params.largest_layer, 8, 2, cpu_offload=False, cpu_offload_params=False, zero_init=True
    )
    assert model_states(params, 3, "none", 2, 8).gpu_bytes == gpu


@pytest.mark.parametrize("preset", ["debug", "base", "large"])
@pytest.mark.parametrize("schedule", SCHEDULES[:3])
def test_checkpointing_and_micro_batch_order_activation_memory(preset, schedule):
    m = ModelConfig(preset=preset, vocab_size=32000)
    n = m.max_source_positions
    if schedule is not None:
        m.pooling_schedule = [min(n, w * n // 512) for w in schedule] + [schedule[-1] * n // 512] * (
            m.encoder_layers - len(schedule)
        )
    peak = {
        c: activation_bytes(m, 2, n, m.max_target_positions, checkpointing=c).peak_bytes
        for c in ("off", "stage", "layer")
    }
    assert peak["off"] > peak["stage"] and peak["off"] > peak["layer"]  # layer keeps more inputs than stage
    assert activation_bytes(m, 4, n, m.max_target_positions).peak_bytes > peak["off"]
    more_pooling = ModelConfig(preset=preset, vocab_size=32000, pooling_schedule=[n // 4] * m.encoder_layers)
    assert (
        activation_bytes(more_pooling, 2, n, m.max_target_positions).peak_bytes
        < activation_bytes(
            ModelConfig(preset=preset, vocab_size=32000, variant="blockwise"), 2, n, m.max_target_positions
        ).peak_bytes
    )


@pytest.mark.parametrize(
    "schedule, checkpointing",
    [([512, 512, 512], "off"), ([128, 64, 32], "off"), ("{0: 256}", "stage"), (None, "layer")],
)
def test_activation_estimate_within_20_percent_of_a_real_step(schedule, checkpointing):
    import torch

    from pyramidion_ds.tune.measure import measure_activation_peak

    m = ModelConfig(preset="debug", vocab_size=256, pooling_schedule=schedule)
    got = measure_activation_peak(m, 4, 512, 128, dtype=torch.float32, checkpointing=checkpointing)
    est = activation_bytes(m, 4, 512, 128, precision="fp32", checkpointing=checkpointing)
    assert 0.8 < est.peak_bytes / got.peak_bytes < 1.2, (est.peak_bytes, got.peak_bytes)


def test_plan_picks_the_fastest_that_fits_and_more_memory_never_hurts():
    m = ModelConfig(preset="base", vocab_size=32000)
    small = make_plan(m, Cluster(1, 8, 16, 512), 8192, 512, 64)
    big = make_plan(m, Cluster(1, 8, 80, 512), 8192, 512, 64)
    assert small.chosen and big.chosen and big.chosen.time <= small.chosen.time
    assert small.chosen.gpu_gib <= small.budget_gib
    assert all(c.time >= small.chosen.time - 1e-12 for c in small.candidates if c.fits)


def run_tune(args, capsys):
    from pyramidion_ds.cli.tune import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_impossible_budget_says_what_the_smallest_need_is(tmp_path, capsys):
    code, out, err = run_tune(
        [
            "--preset",
            "large",
            "--src-len",
            "65536",
            "--gpus-per-node",
            "1",
            "--gpu-mem-gib",
            "0.5",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 1
    assert "nothing fits: smallest need is " in err and " GiB per GPU with ZeRO-3, offload all, micro-batch 1" in err
    assert not (tmp_path / "ds_config.json").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "base", "--nodes", "2", "--gpus-per-node", "8", "--global-batch-tokens", "1048576"],
        [
            "--preset",
            "large",
            "--gpus-per-node",
            "1",
            "--gpu-mem-gib",
            "24",
            "--global-batch-size",
            "64",
            "--pooling-schedule",
            "{0: 2048, 1: 512}",
        ],
        [
            "--preset",
            "large",
            "--gpus-per-node",
            "4",
            "--gpu-mem-gib",
            "16",
            "--src-len",
            "32768",
            "--precision",
            "fp16",
        ],
    ],
)
def test_written_json_passes_our_merge_and_deepspeeds_parser(tmp_path, capsys, argv):
    import yaml
    from deepspeed.runtime.config import DeepSpeedConfig

    from pyramidion_ds.engine import read_ds_config, resolve_ds_config
    from pyramidion_ds.tune.plan import override_flags

    code, out, _ = run_tune(argv + ["--out", str(tmp_path)], capsys)
    assert code == 0 and "chosen:" in out
    overrides = yaml.safe_load((tmp_path / "trainer_overrides.yaml").read_text())
    cfg = load_config(None, override_flags(overrides))
    ds = read_ds_config(tmp_path / "ds_config.json")
    world = ds["train_batch_size"] // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
    resolved = resolve_ds_config(ds, cfg, world, source="tuned")
    parsed = DeepSpeedConfig(
        {
            **resolved,
            "train_batch_size": resolved["train_micro_batch_size_per_gpu"] * resolved["gradient_accumulation_steps"],
        }
    )
    assert parsed.zero_optimization_stage == json.loads((tmp_path / "plan.json").read_text())["chosen"]["stage"]
    assert cfg.train.activation_checkpointing in ("off", "stage", "layer")


def test_every_option_has_help_text():
    from pyramidion_ds.cli.tune import build_parser

    missing = [
        action.option_strings[0]
        for action in build_parser()._actions
        if action.option_strings and not (action.help or "").strip()
    ]
    assert missing == []


def test_cpu_device_speaks_of_processes_ram_and_fp32(tmp_path, capsys):
    code, out, err = run_tune(
        [
            "--preset",
            "debug",
            "--device",
            "cpu",
            "--gpus-per-node",
            "2",
            "--cpu-mem-gib",
            "16",
            "--global-batch-size",
            "8",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 0, err
    assert "1 node(s) x 2 CPU processes, 8 GiB RAM each" in out and "; fp32" in out
    assert "RAM GiB" in out.splitlines()[2] and "per CPU process of" in out
    assert "GPU" not in out and "80 GiB" not in out and "bf16" not in out
    assert json.loads((tmp_path / "ds_config.json").read_text())["bf16"] == {"enabled": False}


def test_cpu_memory_measurement_prints_no_profiler_markers(capfd):
    import torch

    from pyramidion_ds.tune.measure import cpu_peak_bytes

    assert cpu_peak_bytes(lambda: torch.ones(1000).sum()) > 0
    captured = capfd.readouterr()
    assert "USDT" not in captured.out + captured.err and "profiler_start" not in captured.out + captured.err


def test_gpu_plan_on_a_machine_without_gpus_prints_only_the_plan(tmp_path):
    """Planning for GPUs here (where DeepSpeed, imported to check the JSON, finds none) prints no GPU-probe
    warning, and the "train with:" line is a command a shell passes on as the config reads it."""
    import os
    import shlex
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    argv = ["--preset", "debug", "--src-len", "256", "--tgt-len", "64", "--gpus-per-node", "2", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "pyramidion_ds.cli.tune", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unable to detect" not in proc.stdout + proc.stderr, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("train with: pyramidion-train CONFIG ")]
    flags = shlex.split(line.removeprefix("train with: pyramidion-train CONFIG "))
    assert "'off'" not in line and "--train.activation_checkpointing" in flags
    cfg = load_config(None, flags)
    assert cfg.train.activation_checkpointing == "off" and cfg.model.preset == "debug"
