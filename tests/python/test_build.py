"""Properties of the build itself."""

import pytest
import torch

import deepseek_ext


def test_parallel_for_uses_every_thread():
    # ATen's parallel_for is inline in its headers: a library compiled without
    # OpenMP runs every "parallel" CPU kernel on the calling thread, silently.
    n = torch.get_num_threads()
    if n < 2:
        pytest.skip("torch runs one thread here")
    assert deepseek_ext._C.parallel_for_threads(64 * n) == n
