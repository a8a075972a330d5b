"""pytest hooks only; helpers shared by the tests are in utils.py."""

import pytest

from utils import HAS_CUDA, NO_CUDA_REASON


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
