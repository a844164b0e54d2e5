"""tools/gpu_benchmarks.sh cannot run here; its plan can: every step within the 8-minute budget, and
every benchmark command accepted by that benchmark's own argument parser."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pyramidion_ds.bench import encoder as encoder_bench
from pyramidion_ds.bench import train as train_bench

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_benchmarks.sh"
PARSERS = {"encoder": encoder_bench.build_parser, "train": train_bench.build_parser}


def plan(*args):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "OUT": "/nonexistent/out"},
    )
    assert proc.returncode == 0, proc.stderr
    steps = []
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"(\w+) \(limit (\d+)s\): (.*)", line)
        assert match, line
        steps.append((match[1], int(match[2]), shlex.split(match[3])))
    return steps


def test_plan_covers_tests_and_benchmarks_within_eight_minutes():
    steps = plan()
    names = [name for name, _, _ in steps]
    assert names == ["tests_gpu", "topk", "encoder", "train", "train_compile"]
    assert sum(limit for _, limit, _ in steps) <= 8 * 60
    train = next(cmd for name, _, cmd in steps if name == "train")
    args = PARSERS["train"]().parse_args(train[train.index("train") + 1 :])
    assert args.src_len == [8192, 16384] and args.stages == [2, 3]
    assert set(args.variants) == {"vanilla", "blockwise", "pyramidion"}
    assert not Path("/nonexistent/out").exists()


def test_every_benchmark_command_parses():
    every = "tests_gpu topk encoder train train_compile encoder_compile train_overflow generate generate_hard calibrate"
    for _name, _, cmd in plan(*every.split()):
        if "pyramidion_ds.cli.bench" not in cmd:
            continue
        suite = cmd[cmd.index("pyramidion_ds.cli.bench") + 1]
        if suite in PARSERS:
            PARSERS[suite]().parse_args(cmd[cmd.index(suite) + 1 :])


def test_unknown_step_is_refused_in_one_line():
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown step 'nope'" in proc.stderr


@pytest.mark.parametrize("step", ["encoder", "train", "generate"])
def test_a_single_step_can_be_planned(step):
    assert [name for name, _, _ in plan(step)] == [step]
