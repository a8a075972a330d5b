import pytest
import torch

import deepseek_ext  # noqa: F401  (loads the ops)

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA GPU on this machine (the CUDA kernels are still compiled by the build)"

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_script(script, out_path, env_overrides=None):
    """Runs `script` in a fresh Python process that imports this checkout's
    deepseek_ext, with sys.argv[1] = out_path and the environment changed by
    env_overrides (a value of None removes the variable); returns
    torch.load(out_path). For settings read once per process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(deepseek_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    for key, value in (env_overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    subprocess.run([sys.executable, "-c", script, str(out_path)], env=env, check=True)
    return torch.load(out_path)
