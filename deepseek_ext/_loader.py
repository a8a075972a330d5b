"""Loads the compiled library after checking the torch it was built against.

``import deepseek_ext`` tries once (:func:`try_load`). When the library is not
built, the package still imports and :func:`library` raises, when an op is
called, an error that says how to build it; a library built for another torch
or CPU is an ImportError at once.
Fake kernels (:func:`register_fake`) are registered only once the library has
defined their ops.
"""

import importlib
import re

import torch

# Minor versions this source tree builds against (setup.py reads this line; pyproject.toml's
# torch range says the same). The compiled library uses torch's C++ ABI, which changes
# between minor versions: it runs only under the minor version it was built against.
SUPPORTED_TORCH = ((2, 11), (2, 12), (2, 13), (2, 14), (2, 15))

_BUILD_HINT = "run `make build` (or `pip install --no-build-isolation -e .`) in the source tree"
_REBUILD_HINT = (
    "rebuild it against the installed torch: `pip install --no-build-isolation --no-deps --force-reinstall .` "
    "in the source tree (`make build` for a development checkout), or reinstall deepseek_ext from source"
)

_lib = None  # the loaded deepseek_ext._C module
_error = None  # why it could not be loaded (an ImportError), once tried
_pending_fakes = []  # (qualname, fn) waiting for the library to define their op


class NotBuiltError(ImportError):
    """The source tree has no compiled library."""


def _minor(version: str):
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _supported_range():
    lo, hi = SUPPORTED_TORCH[0], SUPPORTED_TORCH[-1]
    return f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"


def load_library():
    """Checks the build against this torch and CPU, then imports deepseek_ext._C
    (which registers the ops). Raises ImportError saying what to do."""
    try:
        from deepseek_ext import _build_config
    except ImportError:
        raise NotBuiltError(f"deepseek_ext's compiled library is not built: {_BUILD_HINT}") from None
    installed = torch.__version__
    built = _build_config.TORCH_VERSION
    if _minor(installed) not in SUPPORTED_TORCH:
        raise ImportError(
            f"deepseek_ext supports torch {_supported_range()}, but torch {installed} is installed"
        )
    if _minor(installed) != _minor(built):
        raise ImportError(
            f"deepseek_ext was built against torch {built} but torch {installed} is installed "
            f"(the library runs only under the torch minor version it was built against); {_REBUILD_HINT}"
        )
    if (torch.version.cuda is None) != (_build_config.TORCH_CUDA_VERSION is None):
        raise ImportError(
            f"deepseek_ext was built against torch {built} with CUDA {_build_config.TORCH_CUDA_VERSION} "
            f"but the installed torch {installed} has CUDA {torch.version.cuda}; {_REBUILD_HINT}"
        )
    if getattr(_build_config, "CPU_ISA", "generic") == "avx2":
        missing = _missing_cpu_flags(("avx2", "fma", "f16c"))
        if missing:
            raise ImportError(
                f"deepseek_ext was built with AVX2 CPU kernels but this CPU lacks {', '.join(missing)}; "
                "rebuild with DEEPSEEK_EXT_CPU_ISA=generic"
            )
    try:
        return importlib.import_module("deepseek_ext._C")
    except ModuleNotFoundError as e:
        if e.name != "deepseek_ext._C":
            raise
        raise NotBuiltError(f"deepseek_ext's compiled library (deepseek_ext/_C*.so) is missing: {_BUILD_HINT}") from None


def try_load():
    """Loads the library once; returns it, or None when it is not built (the
    reason is kept for :func:`library`). Other load errors propagate."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            _lib = load_library()
        except NotBuiltError as e:
            _error = e
            return None
        while _pending_fakes:
            torch.library.register_fake(*_pending_fakes.pop(0))
    return _lib


def library():
    """The loaded library; a RuntimeError that says why and how to build when
    there is none."""
    if _lib is None and try_load() is None:
        raise RuntimeError(f"deepseek_ext's operators are not available: {_error}") from _error
    return _lib


def register_fake(qualname):
    """Decorator: ``torch.library.register_fake(qualname)`` now if the library is
    loaded, otherwise as soon as it is (the op must be defined first)."""

    def register(fn):
        if _lib is not None:
            torch.library.register_fake(qualname, fn)
        else:
            _pending_fakes.append((qualname, fn))
        return fn

    return register


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
