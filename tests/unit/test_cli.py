"""Console scripts: real help, one-line errors."""

import subprocess
import sys

import pytest


def run(module, *args):
    return subprocess.run([sys.executable, "-m", f"pyramidion_ds.cli.{module}", *args], capture_output=True, text=True)


#: runs a console script's main() and then says which heavy packages it imported (on stderr's last line)
HEAVY_IMPORTS = """
import sys
module, *argv = sys.argv[1:]
try:
    __import__(f"pyramidion_ds.cli.{module}", fromlist=["main"]).main(argv)
finally:
    print("imported:", sorted(m for m in ("torch", "deepspeed") if m in sys.modules), file=sys.stderr)
"""


def run_counting_imports(module, *args):
    """``module``'s main on ``args`` in a fresh interpreter; also the heavy packages it imported by then."""
    proc = subprocess.run(
        [sys.executable, "-c", HEAVY_IMPORTS, module, *args], capture_output=True, text=True, timeout=300
    )
    *stderr, imported = proc.stderr.splitlines() or [""]
    return proc, "\n".join(stderr), imported


@pytest.mark.parametrize("module", ["train", "generate", "tune", "preprocess", "bench"])
def test_help(module):
    """--help imports neither torch nor deepspeed (seconds each on a loaded machine)."""
    proc, _, imported = run_counting_imports(module, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pyramidion-")
    assert "issue #" not in proc.stdout  # help is for users; the history is in the commit log
    assert imported == "imported: []"


@pytest.mark.parametrize(
    "module, args, error",
    [
        ("train", ["debug", "--model.bogus", "1"], "pyramidion-train: error: unknown config key 'model.bogus'"),
        ("tune", ["--nodes", "0"], "pyramidion-tune: error: --nodes: got 0, expected >= 1"),
        ("tune", ["--config", "debug", "--preset", "nope"], "pyramidion-tune: error: argument --preset"),
        ("generate", ["."], "pyramidion-generate: error: '.' has no config.yaml: not a run dir"),
        (
            "generate",
            [".", "--nbest", "5", "--beam", "2"],
            "pyramidion-generate: error: generation.nbest: got 5, expected at most generation.beam (2)",
        ),
        ("generate", ["--consolidate", "nope"], "pyramidion-generate: error: 'nope' is not a directory"),
        ("preprocess", [], "pyramidion-preprocess: error: the following arguments are required"),
        ("bench", ["nope"], "pyramidion-bench: error: unknown suite 'nope'"),
    ],
)
def test_bad_input_fails_before_torch_is_imported(module, args, error):
    proc, stderr, imported = run_counting_imports(module, *args)
    assert proc.returncode == 2 and stderr.splitlines()[-1].startswith(error), stderr
    assert imported == "imported: []"


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


@pytest.mark.parametrize(
    "environ, threads",
    [
        ({}, "4"),  # one process owns the 4 cores
        ({"LOCAL_WORLD_SIZE": "2"}, "2"),  # torchrun / DeepSpeed: the node's processes share them
        ({"LOCAL_WORLD_SIZE": "8"}, "1"),
        ({"SLURM_CPUS_PER_TASK": "3", "LOCAL_WORLD_SIZE": "2"}, "3"),  # what SLURM gave the task
        ({"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}, "7"),  # the user's choice wins
    ],
)
def test_generation_threads_are_the_cores_the_process_owns(environ, threads):
    from pyramidion_ds.cli.common import default_threads

    wait = environ.get("OMP_WAIT_POLICY", "PASSIVE")
    default_threads(environ, cores=4)
    assert environ["OMP_NUM_THREADS"] == threads and environ["OMP_WAIT_POLICY"] == wait
