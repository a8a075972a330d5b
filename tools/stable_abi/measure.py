"""Builds tools/stable_abi/update_scale_stable.cpp (update_scale_ on torch's
stable ABI) against the running torch, or loads a copy built against another
torch, checks it against deepseek_ext's update_scale_ and times both.

    python tools/stable_abi/measure.py build DIR    # prints the library's path and the build time
    python tools/stable_abi/measure.py run LIB      # under any torch: same results? time per call

The build targets the running torch's stable ABI (TORCH_TARGET_VERSION = its
major.minor), so the library needs no newer torch than the one it was built with.
"""

import os
import sys
import time

import torch
from torch.utils import benchmark, cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tools", "stable_abi", "update_scale_stable.cpp")
ARGS = (2.0, 0.5, 3, 2, 2.0 ** -24, 2.0 ** 24)  # growth, backoff, interval, hysteresis, min, max


def build(out_dir):
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    target = f"-DTORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000"
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    path = cpp_extension.load("dsx_update_scale_stable", [SOURCE], extra_cflags=["-O3", target],
                              extra_include_paths=[os.path.join(ROOT, "csrc", "include")],
                              build_directory=out_dir, is_python_module=False)
    print(f"built {path} against torch {torch.__version__} ({target}) in {time.perf_counter() - start:.1f} s")


def state():
    return [torch.ones(1) * 2.0 ** 16, torch.zeros(1, dtype=torch.int32), torch.full((1,), 2, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int64)]


def run(lib):
    torch.ops.load_library(lib)
    stable = torch.ops.dsx_stable.update_scale_
    import deepseek_ext  # noqa: F401  (the library's own op, built against this torch)

    ours = torch.ops.deepseek_ext.update_scale_
    a, b = state(), state()
    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):
        found_inf = (torch.rand(1, generator=gen) < 0.2).float()
        stable(*a, found_inf, *ARGS)
        ours(*b, found_inf, *ARGS)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (a, b)
    print(f"torch {torch.__version__}: {lib} loaded; 1000 steps equal to deepseek_ext::update_scale_ "
          f"(final scale {a[0].item():g}, skipped {a[3].tolist()})")
    found_inf = torch.zeros(1)
    for name, op in (("deepseek_ext::update_scale_ (full ABI)", ours), ("dsx_stable::update_scale_ (stable ABI)", stable)):
        s = state()
        m = benchmark.Timer("op(*s, f, *args)", globals={"op": op, "s": s, "f": found_inf, "args": ARGS}
                            ).blocked_autorange(min_run_time=1.0)
        print(f"  {name}: median {m.median * 1e6:.2f} us per call from Python ({len(m.times)} blocks)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        raise SystemExit(__doc__)
    build(sys.argv[2]) if sys.argv[1] == "build" else run(sys.argv[2])
