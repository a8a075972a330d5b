"""Properties of the build itself: threads, the C++ standard, the torch
compatibility header (csrc/ops/common/torch_compat.h)."""

import inspect
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

import deepseek_ext
from deepseek_ext import _build_config

from utils import ROOT


def test_parallel_for_uses_every_thread():
    # ATen's parallel_for is inline in its headers: a library compiled without
    # OpenMP runs every "parallel" CPU kernel on the calling thread, silently.
    n = torch.get_num_threads()
    if n < 2:
        pytest.skip("torch runs one thread here")
    assert deepseek_ext._C.parallel_for_threads(64 * n) == n


def _torch_include():
    return cpp_extension.include_paths()[0]


def _torch_config():
    return os.path.join(torch.utils.cmake_prefix_path, "Torch", "TorchConfig.cmake")


def _standards_torch_states():
    """(what torch's CMake config declares, what ATen/ATen.h requires)."""
    with open(_torch_config()) as f:
        declared = {int(n) for n in re.findall(r"(?:CXX_STANDARD |cxx_std_)(\d+)", f.read())}
    with open(os.path.join(_torch_include(), "ATen", "ATen.h")) as f:
        required = int(re.search(r"__cplusplus < 20(\d\d)\d\dL", f.read()).group(1))
    assert len(declared) == 1, declared
    return declared.pop(), required


def test_library_is_compiled_with_torchs_standard():
    declared, required = _standards_torch_states()
    assert declared >= required
    assert _build_config.CXX_STANDARD == declared


def test_torchs_extension_builder_uses_the_same_standard():
    # setup.py leaves -std to torch's BuildExtension, which adds its own to host
    # and nvcc commands that have none: it must be the standard setup.py records
    # and CMake uses.
    source = inspect.getsource(cpp_extension)
    default = re.search(r"cpp_flag_prefix \+ 'c\+\+(\d+)'", source)
    assert default is not None, "cannot find the -std that torch's BuildExtension adds; check setup.py's standard"
    assert int(default.group(1)) == _build_config.CXX_STANDARD


def test_cmake_reads_the_same_standard():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    out = subprocess.run([cmake, f"-DTORCH_CONFIG={_torch_config()}", f"-DTORCH_INCLUDE_DIRS={_torch_include()}",
                          "-P", os.path.join(ROOT, "cmake", "TorchCxxStandard.cmake")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"C++{_build_config.CXX_STANDARD}" in out.stdout


# A small library built from torch_compat.h alone, against the installed torch:
# the header must compile with every torch in the supported range, pick the
# public grouped GEMM exactly when the headers have one, and compute one GEMM
# per group.
_COMPAT_TEST = r"""
#include <torch/library.h>
#include "common/torch_compat.h"

namespace {
at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  return deepseek_ext::compat::grouped_mm(a, b, offs);
}
bool has_public_grouped_mm() { return deepseek_ext::compat::kHasPublicGroupedMm; }
}  // namespace

TORCH_LIBRARY(dsx_compat_test, m) {
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offs) -> Tensor", &grouped_mm);
  m.def("has_public_grouped_mm() -> bool", &has_public_grouped_mm);
}
"""


@pytest.fixture(scope="module")
def compat_ops(tmp_path_factory):
    build = tmp_path_factory.mktemp("torch_compat")
    source = build / "torch_compat_test.cpp"
    source.write_text(_COMPAT_TEST)
    cpp_extension.load("dsx_compat_test", [str(source)], extra_include_paths=[os.path.join(ROOT, "csrc", "ops")],
                       build_directory=str(build), is_python_module=False, verbose=False)
    return torch.ops.dsx_compat_test


def test_compat_header_picks_the_public_grouped_mm_when_torch_has_it(compat_ops):
    public = os.path.exists(os.path.join(_torch_include(), "ATen", "ops", "grouped_mm.h"))
    assert compat_ops.has_public_grouped_mm() == public


def test_compat_grouped_mm_is_one_gemm_per_group(compat_ops):
    torch.manual_seed(0)
    a = torch.randn(10, 16, dtype=torch.float64).float()
    b = torch.randn(3, 16, 8, dtype=torch.float64).float()
    ends = torch.tensor([3, 3, 10], dtype=torch.int32)  # the middle group is empty
    out = compat_ops.grouped_mm(a, b, ends)
    starts = [0] + ends[:-1].tolist()
    ref = torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ends.tolist()))])
    assert out.shape == (10, 8)
    torch.testing.assert_close(out, ref)
