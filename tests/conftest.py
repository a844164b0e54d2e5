"""Shared test setup: markers by folder, GPU tests skipped cleanly without CUDA."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    has_cuda = torch.cuda.is_available()
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in ("gpu", "cluster", "integration"):
            item.add_marker(getattr(pytest.mark, folder))
        if folder == "gpu" and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture
def shared_data():
    """The real PubMed/QMSum samples in ../shared/data; tests using them skip if it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
