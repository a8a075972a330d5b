"""Which kernels cuBLAS and matmul_unscale_check launch at 8192^3 (float16 and
bfloat16 in, float32 out), with their CUDA times from torch.profiler.

Issue 3 asks where the fused kernel's last 3% against cuBLAS goes. The names
tell cuBLAS's tile shape, cluster and split-K/stream-K choice; run under
Nsight Compute (gpu_check.sh's ncu_gemm step) the same launches get hardware
counters. One profiled call each after one warm-up call.

    python benchmarks/gpu/gemm_kernels.py [--size 8192]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import deepseek_ext  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--no-profiler", action="store_true", help="only launch (for ncu)")
    args = p.parse_args()
    n = args.size
    for dtype in (torch.float16, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(dtype).cuda().t()  # a weight-gradient A^T view
        b = torch.randn(n, n, generator=gen).to(dtype).cuda()
        inv = torch.full((1,), 2.0**-16, device="cuda")
        found = torch.zeros(1, device="cuda")
        calls = {
            "cuBLAS mm, float32 out": lambda: torch.mm(a, b, out_dtype=torch.float32),
            "cuBLAS matmul, input dtype out": lambda: torch.matmul(a, b),
            "matmul_unscale_check, float32 out": lambda: deepseek_ext.ops.matmul_unscale_check(
                a, b, inv, found, out_dtype=torch.float32),
        }
        for fn in calls.values():
            fn()
        torch.cuda.synchronize()
        if args.no_profiler:
            for fn in calls.values():
                fn()
            torch.cuda.synchronize()
            continue
        for label, fn in calls.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            for e in prof.key_averages():
                if e.self_device_time_total > 0 and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                    print(f"{str(dtype)[6:]:8s} | {label:34s} | {e.self_device_time_total / 1e3:8.3f} ms | "
                          f"{e.key[:230]}", flush=True)
        assert found.item() == 0.0


if __name__ == "__main__":
    main()
