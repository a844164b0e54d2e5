"""tools/gpu_benchmarks.sh: its plan (every step within the 8-minute budget, every benchmark command accepted
by its own parser, every suite writing its own JSON), and its CPU miniature: every step run at toy sizes,
every JSON file it leaves parses, and a suite killed half-way leaves the rows it measured."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyramidion_ds.bench import encoder as encoder_bench
from pyramidion_ds.bench import train as train_bench

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_benchmarks.sh"
PARSERS = {"encoder": encoder_bench.build_parser, "train": train_bench.build_parser}
DEFAULT_STEPS = ["env", "precompile", "topk", "encoder", "train", "train_graphs", "generate_variants", "tests_gpu"]


def plan(*args, env=None):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or {"PATH": "/usr/bin:/bin", "OUT": "/nonexistent/out"},
    )
    assert proc.returncode == 0, proc.stderr
    steps = []
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"(\w+) \(limit (\d+)s\): (.*)", line)
        assert match, line
        steps.append((match[1], int(match[2]), shlex.split(match[3])))
    return steps


def suite_args(cmd):
    suite = cmd[cmd.index("pyramidion_ds.cli.bench") + 1]
    return suite, cmd[cmd.index("pyramidion_ds.cli.bench") + 2 :]


def test_plan_checks_imports_first_and_fits_eight_minutes():
    steps = plan()
    assert [name for name, _, _ in steps] == DEFAULT_STEPS
    assert sum(limit for _, limit, _ in steps) <= 8 * 60
    commands = {name: cmd for name, _, cmd in steps}
    # every suite writes its own JSON file (never stdout redirected into it)
    for name, cmd in commands.items():
        if name != "tests_gpu":
            assert cmd[-2:] == ["--output", f"/nonexistent/out/{name}.json"], name
    assert "--precompile" in commands["precompile"] and "--compile" in commands["topk"]
    train = PARSERS["train"]().parse_args(suite_args(commands["train"])[1])
    assert train.src_len == [8192, 16384] and train.stages == [2, 3]
    assert set(train.variants) == {"vanilla", "blockwise", "pyramidion"}
    graphs = PARSERS["train"]().parse_args(suite_args(commands["train_graphs"])[1])
    assert graphs.compile and graphs.compile_mode == "reduce-overhead" and graphs.variants == ["pyramidion"]
    encoder = PARSERS["encoder"]().parse_args(suite_args(commands["encoder"])[1])
    assert encoder.lengths == "8192,16384,32768,65536" and encoder.dtype == "bf16"
    assert {"pyramidion", "pyramidion_default_schedule"} <= set(encoder.variants.split(","))
    generate = " ".join(commands["generate_variants"])
    assert "generate --variants pyramidion,blockwise,vanilla --device cuda --dtype bf16" in generate
    assert not Path("/nonexistent/out").exists()


def test_every_benchmark_command_parses():
    every = "encoder train train_graphs encoder_compile train_overflow"
    for env in (None, {"PATH": "/usr/bin:/bin", "OUT": "/nonexistent/out", "MINI": "1"}):
        for _name, _, cmd in plan(*every.split(), env=env):
            suite, args = suite_args(cmd)
            PARSERS[suite]().parse_args(args)


def test_unknown_step_is_refused_in_one_line():
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown step 'nope'" in proc.stderr


@pytest.mark.parametrize("step", ["encoder", "train", "generate_variants"])
def test_a_single_step_can_be_planned(step):
    assert [name for name, _, _ in plan(step)] == [step]


def test_cpu_miniature_runs_every_step_and_leaves_only_valid_json(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, MINI="1")
    env.pop("PYRAMIDION_TOPK", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == DEFAULT_STEPS, proc.stdout
    for name, entry in summary.items():
        log = (out / "logs" / f"{name}.log").read_text()
        assert entry["exit"] == 0, f"{name}: {entry}\n{log[-3000:]}"
    files = sorted(out.glob("*.json"))
    for path in files:
        json.loads(path.read_text())  # every file parses, whatever its step did
    names = {path.stem for path in files}
    assert set(DEFAULT_STEPS) - {"tests_gpu"} | {"summary"} <= names
    environment = json.loads((out / "env.json").read_text())
    assert environment["torch"]["version"] and not environment["torch"]["cuda_available"]
    assert environment["optimizer"] == {"optimizer": "torch.AdamW"}  # the CPU fallback, named
    encoder = json.loads((out / "encoder.json").read_text())
    assert encoder["complete"] and [row["length"] for row in encoder["results"]] == [128, 256]
    assert all("tokens_per_s" in row["pyramidion_default_schedule"] for row in encoder["results"])
    train = json.loads((out / "train.json").read_text())
    assert {row["variant"] for row in train["rows"] if "tokens_per_s" in row} == {"vanilla", "blockwise", "pyramidion"}
    graphs = json.loads((out / "train_graphs.json").read_text())
    assert graphs["rows"] and "error" not in graphs["rows"][0], graphs


def test_a_suite_killed_half_way_leaves_valid_json_with_its_rows(tmp_path):
    """Each row rewrites the file atomically: kill the encoder benchmark after its first length, the file
    still parses, holds that row, and says the run is not complete."""
    output = tmp_path / "encoder.json"
    cmd = [sys.executable, "-m", "pyramidion_ds.cli.bench", "encoder", "--preset", "debug", "--lengths"]
    cmd += ["128,256,512,512,512,512", "--variants", "blockwise", "--repeats", "1", "--warmup", "0"]
    cmd += ["--output", str(output)]
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        rows = []
        while not rows and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            if output.exists():
                rows = json.loads(output.read_text())["results"]  # parses at every moment
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    report = json.loads(output.read_text())
    assert 1 <= len(report["results"]) < 6 and not report["complete"], report
    assert report["results"][0]["length"] == 128 and "tokens_per_s" in report["results"][0]["blockwise"]
