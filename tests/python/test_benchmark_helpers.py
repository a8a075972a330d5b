"""The benchmarks' shared timing helper measures what its tables say it does."""

import importlib.util
import os

import torch

import deepseek_ext

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(deepseek_ext.__file__)))


def _benchmarks_common():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(_ROOT, "benchmarks", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_seconds_times_with_the_callers_thread_count():
    # torch.utils.benchmark.Timer runs its statement on one thread unless told
    # otherwise; the tables' headers state torch's thread count.
    common = _benchmarks_common()
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    seen = []
    try:
        common.median_seconds(lambda: seen.append(torch.get_num_threads()), "cpu", min_run_time=0.01)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == before
