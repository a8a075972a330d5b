import pytest
import torch

import deepseek_ext  # noqa: F401  (loads the ops)

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA GPU on this machine (the CUDA kernels are still compiled by the build)"

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
