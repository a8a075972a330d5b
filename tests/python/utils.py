"""Helpers shared by the Python tests: `from utils import DEVICES, run_script`.

(pytest puts this folder on sys.path; conftest.py keeps only pytest's hooks.)
"""

import os
import subprocess
import sys

import pytest
import torch

import deepseek_ext  # noqa: F401  (loads the ops)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA GPU on this machine (the CUDA kernels are still compiled by the build)"

# Parametrise device-dependent tests with this; the "cuda" case is skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])]


def python_env(env_overrides=None, root=ROOT):
    """os.environ with `root` first on PYTHONPATH (so a fresh Python imports that
    tree's deepseek_ext) and `env_overrides` applied (a value of None removes the
    variable)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    for key, value in (env_overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_script(script, out_path, env_overrides=None):
    """Runs `script` in a fresh Python process that imports this checkout's
    deepseek_ext, with sys.argv[1] = out_path and the environment changed by
    env_overrides (a value of None removes the variable); returns
    torch.load(out_path). For settings read once per process."""
    subprocess.run([sys.executable, "-c", script, str(out_path)], env=python_env(env_overrides), check=True)
    return torch.load(out_path)


def run_ranks(target, *args, world=2, timeout=120):
    """target(rank, world, init_file, *args) in `world` spawned processes joined by a
    file-based rendezvous in a temporary folder; every process must exit cleanly
    within `timeout` seconds."""
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=target, args=(r, world, init_file, *args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def finish_rank():
    """The end of a run_ranks worker: an orderly Gloo teardown (barrier, release,
    destroy), then os._exit, since interpreter teardown can make Gloo abort a rank
    that has finished while its peer is still closing."""
    import gc

    import torch.distributed as dist

    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    os._exit(0)


def sgd_logsumexp_steps(model, batches):
    """SGD steps (momentum 0.9) on the mean of logsumexp over each batch of tokens (a
    stand-in loss). Not Adam: an attention key bias's gradient is zero up to rounding
    (softmax ignores a shift), and Adam's g / sqrt(v) turns that rounding noise into
    lr-sized steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for tokens in batches:
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
