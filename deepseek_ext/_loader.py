"""Loads the compiled library after checking the torch it was built against."""

import importlib
import re

import torch

SUPPORTED_TORCH = ((2, 11),)  # minor versions this source tree builds against


def _minor(version: str):
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def load_library():
    try:
        from deepseek_ext import _build_config
    except ImportError:
        raise ImportError(
            "deepseek_ext is not built: run `pip install --no-build-isolation .` "
            "(or `make build`) in the source tree"
        ) from None
    installed = torch.__version__
    built = _build_config.TORCH_VERSION
    if _minor(installed) not in SUPPORTED_TORCH:
        raise ImportError(
            f"deepseek_ext supports torch {', '.join('%d.%d' % v for v in SUPPORTED_TORCH)}.x, "
            f"but torch {installed} is installed"
        )
    if _minor(installed) != _minor(built) or (torch.version.cuda is None) != (
        _build_config.TORCH_CUDA_VERSION is None
    ):
        raise ImportError(
            f"deepseek_ext was built against torch {built} but torch {installed} is installed; "
            "rebuild it with `pip install --no-build-isolation --force-reinstall .`"
        )
    if getattr(_build_config, "CPU_ISA", "generic") == "avx2":
        missing = _missing_cpu_flags(("avx2", "fma", "f16c"))
        if missing:
            raise ImportError(
                f"deepseek_ext was built with AVX2 CPU kernels but this CPU lacks {', '.join(missing)}; "
                "rebuild with DEEPSEEK_EXT_CPU_ISA=generic"
            )
    return importlib.import_module("deepseek_ext._C")


def _missing_cpu_flags(required):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [r for r in required if r not in flags]
    except OSError:
        pass
    return []  # unknown platform: trust the build
