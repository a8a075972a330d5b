"""deepseek_ext: a PyTorch extension that makes training cheaper.

Importing the package loads the compiled library (that registers every operator
as ``torch.ops.deepseek_ext.*``, then the fake kernels of :mod:`deepseek_ext.ops`);
one built for another torch minor version or CPU raises an ImportError that
says so. In a source tree where it is not built, the package still imports:
:mod:`deepseek_ext.data`, :mod:`deepseek_ext.train` and the pure-Python parts of
:mod:`deepseek_ext.distributed` work, and the first call of an op raises an
error that says how to build the library.
"""

from deepseek_ext import _loader
from deepseek_ext._version import __version__

_loader.try_load()

from deepseek_ext import ops  # noqa: E402  (its fake kernels wait for the library)
from deepseek_ext import amp, nn  # noqa: E402

__all__ = ["ops", "amp", "nn", "__version__"]


def __getattr__(name):
    if name == "_C":  # the pybind11 module, when it could not be loaded: say why
        try:
            return _loader.library()
        except RuntimeError as e:
            raise AttributeError(f"deepseek_ext._C: {e}") from e
    raise AttributeError(f"module 'deepseek_ext' has no attribute {name!r}")
