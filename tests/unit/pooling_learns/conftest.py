"""The pooling-learns experiment is scripts, not a package: put its folder on sys.path, as running one of
them does (``python tools/experiments/pooling_learns/run.py`` imports ``report`` and ``selection`` beside it)."""

import sys
from pathlib import Path

EXPERIMENT = Path(__file__).resolve().parents[3] / "tools" / "experiments" / "pooling_learns"
if str(EXPERIMENT) not in sys.path:
    sys.path.insert(0, str(EXPERIMENT))
