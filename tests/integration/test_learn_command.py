"""The pooling-learns experiment (tools/experiments/pooling_learns/run.py, run as a script) end to end at a
toy budget: corpus, vocabulary, the warm-up stages of growing document length, the main run started from
the last stage's weights, generation, ROUGE, selection recall and the report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from ds_helpers import ROOT, subprocess_env

pytestmark = pytest.mark.integration
RUN = [sys.executable, str(ROOT / "tools" / "experiments" / "pooling_learns" / "run.py")]


def test_learn_trains_generates_scores_and_reports_one_variant(tmp_path):
    """The default suite's smoke test of the experiment: corpus, vocabulary, training, generation, ROUGE,
    selection recall and the report, without the warm-up stages (those are in the experiment test below)."""
    out = tmp_path / "learn"
    argv = [
        *RUN,
        "--task",
        "synthetic",
        "--out",
        str(out),
        "--variants",
        "pyramidion",
        "--train-docs",
        "8",
        "--max-update",
        "2",
        "--curriculum-updates",
        "0",
        "--bench-repeats",
        "0",
        "--threads",
        "1",
        "--set",
        "train.validate_interval_updates=2",
        "--set",
        "train.log_interval=1",
        "--set",
        "generation.beam=1",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((out / "learn.json").read_text())
    row = result["variants"]["pyramidion"]
    assert row["updates"] == 2 and not row.get("warmup") and result["curriculum"] is None
    assert set(row["rouge"]) >= {"rouge1", "rouge2", "rougeL"}
    assert 0.0 <= row["selection"]["recall"] <= 1.0
    assert "| pyramidion |" in (out / "learn.md").read_text()


@pytest.mark.experiment
def test_learn_warms_up_in_stages_then_trains_generates_and_reports(tmp_path):
    out = tmp_path / "learn"
    argv = [
        *RUN,
        "--task",
        "synthetic",
        "--out",
        str(out),
        "--variants",
        "pyramidion",
        "--train-docs",
        "24",
        "--max-update",
        "4",
        "--curriculum-updates",
        "2",
        "--bench-repeats",
        "0",
        "--threads",
        "1",
        "--set",
        "train.validate_interval_updates=2",
        "--set",
        "train.log_interval=1",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    result = json.loads((out / "learn.json").read_text())
    row = result["variants"]["pyramidion"]
    stages = result["curriculum"]["stages"]
    assert len(row["warmup"]) == len(stages) >= 2
    assert all(st["updates"] == 2 and st["exit_code"] == 0 for st in row["warmup"])
    assert row["updates"] == 4
    spm = (out / "data-bin" / "spm.model").read_bytes()
    longest = []
    for k, _stage in enumerate(stages, 1):
        # every stage shares the main corpus's vocabulary and starts from the previous stage's weights
        assert (out / f"data-bin-warmup-{k}" / "spm.model").read_bytes() == spm
        log = (out / "runs" / f"pyramidion.warmup-{k}.train.log").read_text()
        assert ("initialized weights from" in log) == (k > 1)
        if k > 1:
            assert f"pyramidion.warmup-{k - 1}" in log
        lengths = json.loads((out / f"preprocess-warmup-{k}.json").read_text())["lengths"]
        longest.append(lengths["train"]["source"]["max"])
    assert longest == sorted(longest) and longest[0] < 256  # shortest documents first
    main_log = (out / "runs" / "pyramidion.train.log").read_text()
    assert f"initialized weights from {out / 'runs' / f'pyramidion.warmup-{len(stages)}'}" in main_log
    # the warm-up batches 4 documents, with a token budget that fits 4 of the stage's longest
    data = yaml.safe_load((out / "runs" / "pyramidion.warmup-1" / "config.yaml").read_text())["data"]
    assert data["max_sentences"] == 4 and data["max_tokens"] == 4 * -(-longest[0] // 128) * 128
    assert result["preprocess"]["lengths"]["train"]["examples"] == 24
    # the clock of the main run's curve starts after the warm-up
    assert row["valid_curve"][0]["seconds"] > sum(st["train_seconds"] for st in row["warmup"])
    assert set(row["rouge"]) >= {"rouge1", "rouge2", "rougeL"}
    assert 0.0 <= row["selection"]["recall"] <= 1.0
    report = (out / "learn.md").read_text()
    assert f"{2 * len(stages)} warm-up + 4" in report
    assert f"Warm-up: each variant first trains in {len(stages)} stages" in report


def test_learn_rejects_a_warm_up_for_a_task_without_one(tmp_path):
    proc = subprocess.run(
        [*RUN, "--task", "real", "--out", str(tmp_path / "real"), "--curriculum-updates", "5"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "--curriculum-updates 5" in proc.stderr and "task real has no warm-up corpus" in proc.stderr
    assert not (tmp_path / "real").exists()
