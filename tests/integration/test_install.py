"""A regular (non-editable) install works away from the checkout: the console scripts run from another
directory and find the shipped DeepSpeed JSONs by name, from the installed copy of the package.

The venv has the checkout installed editable (an ``__editable__`` finder on ``sys.meta_path``); the copy
installed here goes first on ``PYTHONPATH``, which ``sys.path`` searches before that finder, and the test
asserts which one was imported. Offline: no index, no build isolation (setuptools from the venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: what a build of the package reads (setup.py's packages, package_data, long_description)
SOURCES = ("setup.py", "pyproject.toml", "README.md", "pyramidion_ds", "ds_configs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --target`` of a copy of the checkout (pip builds in the source tree: build/ and
    *.egg-info land in the copy, not in the checkout); returns the target, a site dir with bin/."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    target = base / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return target


def run_installed(target: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run with only the installed copy on PYTHONPATH (not the checkout), from ``cwd``."""
    env = dict(os.environ, PYTHONPATH=str(target), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_installed_copy_finds_shipped_ds_configs_by_name(installed, tmp_path):
    code = (
        "import json, pyramidion_ds\n"
        "from pyramidion_ds.config import load_config\n"
        "from pyramidion_ds.engine.ds_config import ds_config_path, shipped_ds_configs\n"
        "print(json.dumps({'package': pyramidion_ds.__file__, 'shipped': sorted(shipped_ds_configs()),\n"
        "  'default': str(ds_config_path(load_config(None).train.deepspeed_config)),\n"
        "  'by_name': str(ds_config_path('zero3_bf16')), 'with_suffix': str(ds_config_path('zero3_bf16.json'))}))"
    )
    got = json.loads(run_installed(installed, tmp_path, sys.executable, "-c", code).stdout.strip().splitlines()[-1])
    package = installed / "pyramidion_ds"
    assert Path(got["package"]) == package / "__init__.py"  # the installed copy, not the checkout
    assert got["shipped"] == sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))
    shipped = package / "ds_configs"
    assert Path(got["default"]) == shipped / "zero2_cpu.json"
    assert Path(got["by_name"]) == Path(got["with_suffix"]) == shipped / "zero3_bf16.json"


def test_console_scripts_run_from_another_directory(installed, tmp_path):
    bin_dir = installed / "bin"
    proc = run_installed(installed, tmp_path, str(bin_dir / "pyramidion-train"), "--help")
    assert proc.stdout.startswith("usage: pyramidion-train") and "--deepspeed_config" in proc.stdout
    # a real plan: the tuner reads the shipped CPU JSON by name and validates what it writes with DeepSpeed
    proc = run_installed(
        installed,
        tmp_path,
        str(bin_dir / "pyramidion-tune"),
        "--device",
        "cpu",
        "--preset",
        "debug",
        "--src-len",
        "256",
        "--tgt-len",
        "64",
        "--gpus-per-node",
        "2",
        "--cpu-mem-gib",
        "8",
        "--out",
        "tuned",
    )
    assert "wrote tuned/ds_config.json" in proc.stdout
    ds = json.loads((tmp_path / "tuned" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] in (0, 1, 2, 3)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
