"""Fixtures for multi-process tests: a real binarized corpus (real sentencepiece, real preprocess)."""

import subprocess
import sys

import pytest

from ds_helpers import ROOT, subprocess_env


@pytest.fixture(scope="session")
def synthetic_bin(tmp_path_factory):
    """The synthetic corpus, binarized by the real pyramidion-preprocess with a real sentencepiece model."""
    from pyramidion_ds.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("synthetic")
    paths = write_corpus(root / "raw", {"train": 96, "valid": 8, "test": 8}, seed=0, min_words=80, max_words=250)
    dest = root / "bin"
    files = ",".join(f"{split}={path}" for split, path in paths.items())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyramidion_ds.cli.preprocess",
            "--source-files",
            files,
            "--destdir",
            str(dest),
            "--spm-vocab-size",
            "256",
            "--workers",
            "1",
            "--max-source-positions",
            "512",
            "--max-target-positions",
            "128",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest
