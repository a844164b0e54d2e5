"""Run a test module's ``main()`` in a child process under Triton's interpreter and read its JSON line.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton is first imported, and in a pytest
process something else (torch.compile, the model) may have imported it already; so interpreted work runs in
a child, which prints one JSON line as its last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(module: str, **env: str) -> dict:
    """``module`` (e.g. ``tests.unit.test_topk_triton``)'s ``main()`` with TRITON_INTERPRET=1 and ``env`` (a
    variable given as "" is removed); skips the test when triton does not import."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    child_env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    for name, value in env.items():
        if value:
            child_env[name] = value
        else:
            child_env.pop(name, None)
    child = subprocess.run(
        [sys.executable, "-c", f"from {module} import main; main()"],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if child.returncode != 0:
        if "No module named 'triton'" in child.stderr:
            pytest.skip("triton does not import")
        raise AssertionError(f"interpreted run of {module} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])
