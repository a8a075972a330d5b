"""The import-time checks: a mismatched or unsupported torch gives a clear ImportError."""

import pytest
import torch

from deepseek_ext import _build_config, _loader


def test_build_config_matches_the_running_torch():
    assert _loader._minor(_build_config.TORCH_VERSION) == _loader._minor(torch.__version__)


def test_unsupported_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0+cu130")
    with pytest.raises(ImportError, match=r"supports torch 2\.11\.x, but torch 2\.99\.0\+cu130 is installed"):
        _loader.load_library()


def test_torch_other_than_the_build_is_refused(monkeypatch):
    monkeypatch.setattr(_loader, "SUPPORTED_TORCH", ((2, 11), (2, 12)))
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu130")
    with pytest.raises(ImportError, match=r"was built against torch 2\.11.* but torch 2\.12\.0\+cu130 is installed"):
        _loader.load_library()


def test_cpu_without_avx2_is_refused(monkeypatch):
    monkeypatch.setattr(_build_config, "CPU_ISA", "avx2", raising=False)
    monkeypatch.setattr(_loader, "_missing_cpu_flags", lambda required: ["avx2"])
    with pytest.raises(ImportError, match="lacks avx2; rebuild with DEEPSEEK_EXT_CPU_ISA=generic"):
        _loader.load_library()
