"""pyramidion-bench learn end to end at a toy budget: corpus, vocabulary, the short-document warm-up,
the main run started from its weights, generation, ROUGE, selection recall and the report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ds_helpers import ROOT, subprocess_env

pytestmark = pytest.mark.integration


def test_learn_warms_up_on_short_documents_then_trains_generates_and_reports(tmp_path):
    out = tmp_path / "learn"
    argv = [sys.executable, "-m", "pyramidion_ds.cli.bench", "learn", "--task", "synthetic", "--out", str(out),
            "--variants", "pyramidion", "--train-docs", "24", "--max-update", "4", "--curriculum-updates", "3",
            "--bench-repeats", "0", "--threads", "1", "--set", "train.validate_interval_updates=2", "--set", "train.log_interval=1"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    result = json.loads((out / "learn.json").read_text())
    row = result["variants"]["pyramidion"]
    assert row["curriculum"]["updates"] == 3 and row["curriculum"]["exit_code"] == 0
    assert row["updates"] == 4
    # the main run starts from the warm-up's weights, which share the main corpus's vocabulary
    assert "initialized weights from" in (out / "runs" / "pyramidion.train.log").read_text()
    assert (out / "data-bin-curriculum" / "spm.model").read_bytes() == (out / "data-bin" / "spm.model").read_bytes()
    warm_up = json.loads((out / "preprocess-curriculum.json").read_text())["lengths"]["train"]
    assert warm_up["source"]["max"] < 512  # short documents: 200-300 words
    assert result["preprocess"]["lengths"]["train"]["examples"] == 24
    # the clock of the main run's curve starts after the warm-up
    assert row["valid_curve"][0]["seconds"] > row["curriculum"]["train_seconds"]
    assert set(row["rouge"]) >= {"rouge1", "rouge2", "rougeL"}
    assert 0.0 <= row["selection"]["recall"] <= 1.0
    report = (out / "learn.md").read_text()
    assert "3 warm-up + 4" in report and "Warm-up: each variant first trains 3 updates" in report


def test_learn_rejects_a_warm_up_for_a_task_without_one(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyramidion_ds.cli.bench", "learn", "--task", "real", "--out",
                           str(tmp_path / "real"), "--curriculum-updates", "5"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "--curriculum-updates 5" in proc.stderr and "task real has no warm-up corpus" in proc.stderr
    assert not (tmp_path / "real").exists()
