"""What a new user meets in the first hour: the quick start's model really pools, and nothing the README's
commands write shows up in `git status`."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyramidion_ds.config import load_config
from pyramidion_ds.data.synthetic import make_example

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "launch" / "local" / "quickstart.sh"


def quickstart_flag(name: str) -> int:
    return int(re.search(rf"--{name} (\d+)", QUICKSTART.read_text()).group(1))


def test_quickstart_config_pools_every_quickstart_document():
    cfg = load_config("quickstart")
    m = cfg.model
    widths = m.encoder_widths()
    # the corpus the quick start makes: at least one piece per word plus </s>, padded to the chunk size
    words = [
        len(
            make_example(
                i,
                min_words=quickstart_flag("min-words"),
                max_words=quickstart_flag("max-words"),
                num_salient=(quickstart_flag("min-salient"), quickstart_flag("max-salient")),
                split="train",
            ).document.split()
        )
        for i in range(300)
    ]
    narrowest_input = -(-(min(words) + 1) // m.chunk_size) * m.chunk_size
    assert m.variant == "pyramidion" and widths[-1] < narrowest_input, (widths, narrowest_input)
    assert max(words) + 1 <= m.max_source_positions  # nothing is cut
    assert cfg.data.data == "data-bin/synthetic" and cfg.train.save_dir == "runs/quickstart"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize(
    "path",
    [
        "data/synthetic/train.jsonl",
        "data-bin/synthetic/meta.json",
        "runs/quickstart/train.log",
        "tuned/ds_config.json",
        "exports/arxiv/config.yaml",
        "results/arxiv/test.hyp",
        "pyramidion-train-12.out",
        "pyramidion-generate-13.out",
    ],
)
def test_what_the_readme_commands_write_is_ignored_by_git(path):
    proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert proc.returncode == 0, f"{path} is not ignored by .gitignore"


def test_the_dev_extra_installs_the_tools_the_readme_tells_contributors_to_run():
    """README's Tests section: `ruff check`, `pre-commit install`: both come with `pip install -e .[dev]`."""
    import ast

    setup = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    names = {re.split(r"[<>=;\[ ]", requirement)[0] for requirement in extras["dev"]}
    readme = (ROOT / "README.md").read_text()
    assert "pre-commit install" in readme and "ruff check" in readme
    assert {"pre-commit", "ruff", "pytest"} <= names
