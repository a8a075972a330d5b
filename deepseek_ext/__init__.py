"""deepseek_ext: a PyTorch extension that makes training cheaper.

Importing the package checks that the installed torch is the one the compiled
library was built for, loads the library (which registers every operator as
``torch.ops.deepseek_ext.*``), then registers the fake (meta) kernels and
Python wrappers in :mod:`deepseek_ext.ops`.
"""

from deepseek_ext._loader import load_library as _load_library
from deepseek_ext._version import __version__

_C = _load_library()

from deepseek_ext import ops  # noqa: E402  (needs the library loaded first)
from deepseek_ext import amp, nn  # noqa: E402

__all__ = ["ops", "amp", "nn", "__version__"]
