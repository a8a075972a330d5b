"""setuptools' PEP 517 backend, made to compile against the torch the user has.

deepseek_ext uses torch's C++ ABI, so it must be compiled against the torch
minor version it will be imported under. pyproject.toml names no torch in its
build requirements; instead:

* ``pip install --no-build-isolation .``: torch is importable where setup.py
  runs, and the build uses it. Nothing is added.
* ``pip install .`` (build isolation on): pip builds in an empty environment.
  This backend asks the Python that runs pip (the user's environment, without
  pip's isolation paths) which torch it has, and requires exactly that version
  in the build environment, so the library is compiled against the same torch
  release. When the user's environment has no torch, or one outside the range
  this tree supports, it refuses with a message that says what to do.

The supported range is SUPPORTED_TORCH of deepseek_ext/_loader.py.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

from setuptools.build_meta import *  # noqa: F401,F403  (the hooks not overridden here)

ROOT = Path(__file__).resolve().parents[2]

# Variables through which pip's isolated build environment hides the user's
# site-packages from this process; the probe runs without them.
_ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME", "PYTHONSTARTUP")
_PROBE = "import importlib.metadata as m, torch; print(m.version('torch')); print(torch.__file__)"


class TorchMismatch(RuntimeError):
    """The build cannot be made against the user's torch."""


def supported_torch():
    tree = ast.parse((ROOT / "deepseek_ext" / "_loader.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SUPPORTED_TORCH":
            return ast.literal_eval(node.value)
    raise RuntimeError("deepseek_ext/_loader.py defines no SUPPORTED_TORCH")


def _torch_importable():
    """Whether this process (the build environment) can import torch."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def user_torch(python=None, env=None):
    """(version, path) of the torch installed where pip runs, or None: asked of
    that Python in a child process without pip's isolation variables."""
    env = dict(os.environ if env is None else env)
    for name in _ISOLATION_VARIABLES:
        env.pop(name, None)
    out = subprocess.run([python or sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         cwd=os.path.expanduser("~") if os.path.isdir(os.path.expanduser("~")) else None)
    if out.returncode != 0:
        return None
    version, path = out.stdout.strip().splitlines()[-2:]
    return version, path


def _minor(version):
    parts = version.split("+", 1)[0].split(".")
    return int(parts[0]), int(parts[1])


def torch_requirement(found, supported=None, python=None):
    """The build requirement that pins the user's torch, or TorchMismatch with
    the message for the user. `found` is user_torch()'s result."""
    supported = supported or supported_torch()
    lo, hi = supported[0], supported[-1]
    range_text = f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"
    where = python or sys.executable
    if found is None:
        raise TorchMismatch(
            f"deepseek_ext compiles against the torch it will run with, and the Python running pip ({where}) "
            f"has no torch. Install torch {range_text} first, then build against it with "
            "`pip install --no-build-isolation .` (or `pip install .` again)."
        )
    version, path = found
    if _minor(version) not in supported:
        raise TorchMismatch(
            f"deepseek_ext builds against torch {range_text}, but the torch installed where pip runs is "
            f"{version} ({path}). Install a torch in that range, then `pip install --no-build-isolation .`."
        )
    return f"torch=={version}"


def _requirements(base):
    if _torch_importable():
        # No build isolation (or an isolated environment that already has torch):
        # setup.py compiles against the torch it imports.
        return base
    found = user_torch()
    try:
        requirement = torch_requirement(found)
    except TorchMismatch as e:
        # pip shows this process's stderr and stops; SystemExit keeps the message
        # free of a traceback through the backend.
        sys.stderr.write(f"\nerror: {e}\n\n")
        raise SystemExit(1) from None
    sys.stderr.write(
        f"deepseek_ext: pip's isolated build environment gets {requirement}, the torch installed in "
        f"{found[1]}, so the library is compiled against that release "
        "(`pip install --no-build-isolation .` compiles against the installed copy without that download)\n"
    )
    return base + [requirement]


# setuptools' own get_requires_* hooks run setup.py to collect setup_requires
# (there are none), and setup.py imports torch, which an isolated environment
# does not have yet: the static requirements are in pyproject.toml's
# build-system.requires, and these hooks add only torch.
def get_requires_for_build_wheel(config_settings=None):
    return _requirements([])


def get_requires_for_build_editable(config_settings=None):
    return _requirements([])
