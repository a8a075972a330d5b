"""The import-time checks: a mismatched or unsupported torch gives a clear ImportError."""

import os
import re
import subprocess
import sys

import pytest
import torch

from deepseek_ext import _build_config, _loader

from utils import python_env

# A source tree whose library was built against another torch minor version
# (`make test-newest` names the .venv build of the checkout while it runs under
# the newest torch).
OTHER_BUILD = os.environ.get("DEEPSEEK_EXT_OTHER_BUILD", "")


def test_build_config_matches_the_running_torch():
    assert _loader._minor(_build_config.TORCH_VERSION) == _loader._minor(torch.__version__)


def test_supported_torch_is_one_contiguous_range():
    minors = [m for _, m in _loader.SUPPORTED_TORCH]
    assert {major for major, _ in _loader.SUPPORTED_TORCH} == {2}
    assert minors == list(range(minors[0], minors[-1] + 1))
    assert _loader._minor(torch.__version__) in _loader.SUPPORTED_TORCH


def test_unsupported_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0+cu130")
    with pytest.raises(ImportError, match=r"supports torch 2\.11 to 2\.15, but torch 2\.99\.0\+cu130 is installed"):
        _loader.load_library()


def _another_supported_minor():
    built = _loader._minor(_build_config.TORCH_VERSION)
    return next(v for v in _loader.SUPPORTED_TORCH if v != built)


def test_torch_other_than_the_build_is_refused(monkeypatch):
    other = "%d.%d.0+cu130" % _another_supported_minor()
    monkeypatch.setattr(torch, "__version__", other)
    with pytest.raises(ImportError) as e:
        _loader.load_library()
    message = str(e.value)
    assert f"was built against torch {_build_config.TORCH_VERSION} but torch {other} is installed" in message
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in message
    assert "make build" in message


def test_cuda_and_cpu_torch_builds_are_told_apart(monkeypatch):
    monkeypatch.setattr(_build_config, "TORCH_CUDA_VERSION", None if torch.version.cuda else "13.0")
    with pytest.raises(ImportError, match=r"with CUDA .* but the installed torch .* has CUDA .*; rebuild it"):
        _loader.load_library()


def test_cpu_without_avx2_is_refused(monkeypatch):
    monkeypatch.setattr(_build_config, "CPU_ISA", "avx2", raising=False)
    monkeypatch.setattr(_loader, "_missing_cpu_flags", lambda required: ["avx2"])
    with pytest.raises(ImportError, match="lacks avx2; rebuild with DEEPSEEK_EXT_CPU_ISA=generic"):
        _loader.load_library()


@pytest.mark.skipif(not OTHER_BUILD, reason="DEEPSEEK_EXT_OTHER_BUILD names no tree built against another torch "
                    "(make test-newest sets it)")
def test_a_library_built_for_another_torch_is_refused_at_import(tmp_path):
    with open(os.path.join(OTHER_BUILD, "deepseek_ext", "_build_config.py")) as f:
        built = re.search(r"TORCH_VERSION = '([^']+)'", f.read()).group(1)
    assert _loader._minor(built) != _loader._minor(torch.__version__), "that tree is built for this torch"
    # Without the editable install's import hook, PYTHONPATH decides which tree is imported.
    script = ("import sys\n"
              "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
              "import deepseek_ext\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                         env=python_env(root=OTHER_BUILD), capture_output=True, text=True)
    assert out.returncode != 0
    assert f"ImportError: deepseek_ext was built against torch {built} but torch {torch.__version__} is installed" \
        in out.stderr, out.stderr
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in out.stderr
