"""matmul_unscale_check vs torch.matmul alone and vs the unfused sequence.

For each shape (M, N, K) and dtype, in one run:
  * torch.matmul(a, b)                                  -- the GEMM alone, no scaling, no check
  * unfused: out = torch.matmul(a, b) (fp32 out when asked) then
    torch._amp_foreach_non_finite_check_and_unscale_([out], found, inv)  -- torch's best scale + check
  * three ops: the same matmul, out.mul_(inv), then found_inf from torch.isfinite(out)
    -- the issue's "matmul + mul + check" written as separate torch ops
    (for a bfloat16 output on CUDA, which that kernel rejects, the eager composition
    benchmarks.common.torch_unscale_check_)
  * ours: deepseek_ext.ops.matmul_unscale_check(a, b, inv, found, out_dtype)
On the CPU, for float16/bfloat16 inputs, both baselines are also timed by the
float32 route a user would take there (torch's 16-bit CPU GEMM is slow):
a.float() @ b.float(), converted to the output dtype, then the same check; the
ratios are against the faster route.
Weight-gradient shapes use a transposed view for `a`, as a Linear backward does.

    python benchmarks/bench_gemm.py [--device cpu|cuda] [--out DIR]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402
from benchmarks.common import compare_seconds, header, markdown_table, torch_unscale_check_, write_results  # noqa: E402

CPU_CASES = [  # (name, M, N, K, transposed a)
    ("square 1024", 1024, 1024, 1024, False),
    ("square 2048", 2048, 2048, 2048, False),
    ("wgrad (4096x1024)^T (4096x1024)", 1024, 1024, 4096, True),
    # A micro-batch of 256 tokens: a large output for few FLOPs, where the
    # pass over the output that fusion saves matters most.
    ("wgrad (256x4096)^T (256x4096)", 4096, 4096, 256, True),
]
# On the GPU every case passes `a` as a transposed view: the layout of a Linear
# weight gradient, and the one the fused sm90 and sm80 kernels are instantiated for.
# Columns that run the fused sm90 kernel with another tile-scheduler setting
# (environment variables read at every call): the swizzle at CUTLASS's default
# 1 (ours is 8; 2 and 4 measured between them on 2026-11-28), and the raster
# order along M (CUTLASS's heuristic, which ours keeps, takes N on these shapes).
KNOBS = [("swizzle 1", "DEEPSEEK_EXT_GEMM_SWIZZLE", "1"), ("raster along M", "DEEPSEEK_EXT_GEMM_RASTER", "m")]
GPU_CASES = [
    ("4096^3, a = A^T view", 4096, 4096, 4096, True),
    ("8192^3, a = A^T view", 8192, 8192, 8192, True),
    ("wgrad (16384x4096)^T (16384x4096)", 4096, 4096, 16384, True),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--cases", default=None, help="run only the cases whose name contains this text")
    args = p.parse_args(argv)
    dev = args.device
    cases = GPU_CASES if dev == "cuda" else CPU_CASES
    cases = [c for c in cases if args.cases is None or args.cases in c[0]]
    dtypes = [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, None)]
    if dev == "cpu":
        # torch's float16 matmul on CPU is not a fair baseline (4.8 s for 1024^3 here, 100x float32).
        dtypes = [(torch.float32, None), (torch.bfloat16, torch.float32), (torch.bfloat16, None)]

    rows, data = [], []
    for name, M, N, K, transposed in cases:
        for dtype, out_dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(K, M, generator=gen).to(dtype).to(dev).t() if transposed else \
                torch.randn(M, K, generator=gen).to(dtype).to(dev)
            b = torch.randn(K, N, generator=gen).to(dtype).to(dev)
            inv = torch.full((1,), 2.0**-16, device=dev)
            found = torch.zeros(1, device=dev)
            fp32_out = out_dtype == torch.float32 and dtype != torch.float32

            def matmul_alone():
                return torch.matmul(a, b)

            def unfused():
                out = torch.mm(a, b, out_dtype=torch.float32) if (fp32_out and dev == "cuda") else torch.matmul(a, b)
                if fp32_out and out.dtype != torch.float32:
                    out = out.float()
                torch_unscale_check_([out], found, inv)
                return out

            def ours():
                return deepseek_ext.ops.matmul_unscale_check(a, b, inv, found, out_dtype=out_dtype)

            def three_ops():
                out = torch.mm(a, b, out_dtype=torch.float32) if (fp32_out and dev == "cuda") else torch.matmul(a, b)
                if fp32_out and out.dtype != torch.float32:
                    out = out.float()
                out.mul_(inv)
                torch.maximum(found, (~torch.isfinite(out)).any().to(found.dtype), out=found)
                return out

            def matmul_fp32_route():
                return torch.matmul(a.float(), b.float()).to(out_dtype or dtype)

            def unfused_fp32_route():
                out = matmul_fp32_route()
                torch_unscale_check_([out], found, inv)
                return out

            fns = [matmul_alone, unfused, ours, three_ops]
            fp32_route = dev == "cpu" and dtype != torch.float32
            if fp32_route:
                fns += [matmul_fp32_route, unfused_fp32_route]
            # On CUDA, for a float32 output: cuBLAS's float32-output GEMM alone (what a
            # fused kernel as fast as cuBLAS would take), and the fused kernel with
            # each of KNOBS.
            extra_cols = dev == "cuda" and fp32_out
            knobs = KNOBS if extra_cols else []
            if extra_cols:
                fns.append(lambda: torch.mm(a, b, out_dtype=torch.float32))

            def with_env(var, value):
                def run():
                    os.environ[var] = value
                    try:
                        return ours()
                    finally:
                        os.environ.pop(var, None)
                return run
            fns += [with_env(var, value) for _, var, value in knobs]
            ts = compare_seconds(fns, dev, args.rounds, args.min_run_time)
            t_mm, t_unfused, t_ours, t_three = ts[:4]
            t_mm_route, t_unfused_route = (ts[4], ts[5]) if fp32_route else (None, None)
            t_mm32 = ts[4] if extra_cols else None
            t_knob = {label: t for (label, _, _), t in zip(knobs, ts[5:])}
            # The strongest baselines: the faster route of each.
            t_mm_best = min(t_mm, t_mm_route or t_mm)
            t_unfused_best = min(t_unfused, t_unfused_route or t_unfused)
            flops = 2.0 * M * N * K
            # The route it really took, from the fused kernels' call counters.
            counters = (deepseek_ext._C.matmul_unscale_check_fused_sm90_calls,
                        deepseek_ext._C.matmul_unscale_check_fused_sm80_calls,
                        deepseek_ext._C.matmul_unscale_check_cpu_checks_from_inputs)
            before = [c() for c in counters]
            ours()
            took = [c() > n for c, n in zip(counters, before)]
            route = "fused sm90" if took[0] else "fused sm80" if took[1] else "BLAS + check of the inputs" if took[2] \
                else ("cuBLAS + epilogue" if dev == "cuda" else "BLAS panels + epilogue")
            row = [name, f"{str(dtype)[6:]} -> {str(out_dtype or dtype)[6:]}", route, f"{flops / t_mm / 1e12:.3f}",
                   f"{flops / t_unfused / 1e12:.3f}"]
            if dev == "cpu":
                row += [f"{flops / t / 1e12:.3f}" if t else "-" for t in (t_mm_route, t_unfused_route)]
            row += [f"{flops / t_ours / 1e12:.3f}", f"{t_ours / t_mm_best:.3f}", f"{t_unfused_best / t_ours:.3f}",
                    f"{t_three / t_ours:.3f}"]
            if dev == "cuda":
                row.append(f"{flops / t_mm32 / 1e12:.3f}" if t_mm32 else "-")
                row += [f"{flops / t_knob[label] / 1e12:.3f}" if label in t_knob else "-" for label, _, _ in KNOBS]
            rows.append(row)
            data.append(dict(case=name, M=M, N=N, K=K, dtype=str(dtype), out_dtype=str(out_dtype or dtype),
                             route=route, matmul_s=t_mm, unfused_s=t_unfused, ours_s=t_ours,
                             matmul_fp32_route_s=t_mm_route, unfused_fp32_route_s=t_unfused_route, three_ops_s=t_three,
                             mm_fp32_out_s=t_mm32, ours_with_s=t_knob))
            assert found.item() == 0.0
    cols = ["shape", "dtype", "route", "matmul TFLOP/s", "unfused TFLOP/s"]
    if dev == "cpu":
        cols += ["matmul via fp32 TFLOP/s", "unfused via fp32 TFLOP/s"]
    cols += ["ours TFLOP/s", "ours time / matmul time", "speedup vs unfused", "speedup vs three ops"]
    if dev == "cuda":
        cols += ["cuBLAS fp32-out TFLOP/s"] + [f"ours, {label} TFLOP/s" for label, _, _ in KNOBS]
    text = header("matmul_unscale_check vs torch.matmul and the unfused matmul + scale + check", dev)
    text += f"- built with the CUTLASS sm90 kernel: {getattr(deepseek_ext._C, 'with_cutlass_sm90', False)}\n"
    text += f"- built with the CUTLASS sm80 kernel: {getattr(deepseek_ext._C, 'with_cutlass_sm80', False)}"
    if dev == "cuda":
        text += f" (code for this GPU: {deepseek_ext._C.matmul_unscale_check_sm80_has_code_for(torch.cuda.current_device())})"
    text += "\n"
    if dev == "cpu":
        h = torch.randn(1024, 1024).half()
        t0 = time.perf_counter()
        torch.matmul(h, h)
        t_half = time.perf_counter() - t0
        text += (f"- float16 is left out on CPU: one torch.matmul in float16 at 1024^3 took {t_half:.2f} s here "
                 "(not a baseline worth beating)\n")
    text += (f"- times: median over {args.rounds} alternating rounds; 'matmul' is torch.matmul in the input dtype "
             "(no scaling, no check); 'unfused' is matmul (fp32 output when asked) + "
             "torch._amp_foreach_non_finite_check_and_unscale_ (bfloat16 output on CUDA: the eager "
             "_foreach_norm(inf) + isfinite + _foreach_mul_, as torch's kernel rejects it)\n")
    text += ("- 'three ops': the same matmul, then out.mul_(inv_scale), then found_inf from torch.isfinite(out) "
             "(the issue's 'matmul + mul + check' as separate ops; 'unfused' above is the stronger baseline)\n")
    if dev == "cpu":
        text += ("- 'via fp32' (16-bit inputs): torch.matmul(a.float(), b.float()).to(output dtype), then the same "
                 "check for 'unfused'; the last two columns compare ours with the faster route of each baseline\n")
    if dev == "cuda":
        text += ("- 'cuBLAS fp32-out' is torch.mm(a, b, out_dtype=torch.float32) alone (float32 outputs only); "
                 "'ours, X' runs our kernel with one tile-scheduler setting changed before each call: "
                 + "; ".join(f"{label}: {var}={value}" for label, var, value in KNOBS)
                 + " ('ours' runs swizzle 8 and CUTLASS's raster heuristic)\n")
    text += "\n"
    text += markdown_table(cols, rows)
    print(text)
    print(f"written to {write_results('gemm', dev, text, data, args.out)}")


if __name__ == "__main__":
    main()
