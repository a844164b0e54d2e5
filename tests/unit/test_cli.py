"""Console scripts: real help, one-line errors."""

import subprocess
import sys

import pytest


def run(module, *args):
    return subprocess.run([sys.executable, "-m", f"pyramidion_ds.cli.{module}", *args], capture_output=True, text=True)


@pytest.mark.parametrize("module", ["train", "generate", "tune", "preprocess", "bench"])
def test_help(module):
    proc = run(module, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pyramidion-")
    assert "issue #" not in proc.stdout  # help is for users; the history is in the commit log


def test_bench_lists_suites_and_rejects_unknown():
    assert "topk" in run("bench", "--help").stdout
    proc = run("bench", "nope")
    assert proc.returncode == 2 and "unknown suite 'nope'" in proc.stderr


def test_bench_data_names_the_flag_when_the_samples_are_missing(tmp_path):
    proc = run("bench", "data", "--shared-data", str(tmp_path / "nope"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("pyramidion-bench: error: --shared-data: no pubmed_sample.jsonl")


def test_train_validates_config_before_anything():
    proc = run("train", "debug", "--model.chunk_size", "-3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pyramidion-train: error: model.chunk_size: got -3, expected a value >= 1"
    proc = run("train", "no_such_config")
    assert proc.returncode == 2 and "neither a file nor a shipped config" in proc.stderr


def test_list_configs():
    proc = run("train", "--list-configs")
    assert proc.returncode == 0 and proc.stdout.startswith("debug\t")
