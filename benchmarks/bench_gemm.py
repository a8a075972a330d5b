"""matmul_unscale_check vs torch.matmul alone and vs the unfused sequence.

For each shape (M, N, K) and dtype, in one run:
  * torch.matmul(a, b)                                  -- the GEMM alone, no scaling, no check
  * unfused: out = torch.matmul(a, b) (fp32 out when asked) then
    torch._amp_foreach_non_finite_check_and_unscale_([out], found, inv)  -- torch's best scale + check
    (for a bfloat16 output on CUDA, which that kernel rejects, the eager composition
    benchmarks.common.torch_unscale_check_)
  * three ops: the matmul, out.mul_(inv), then found_inf from torch.isfinite(out)
    -- "matmul + mul + check" written as separate torch ops
  * ours: deepseek_ext.ops.matmul_unscale_check(a, b, inv, found, out_dtype)
On the CPU, for float16/bfloat16 inputs, the baselines are also timed by the
float32 route a user would take there (torch's 16-bit CPU GEMM is slow):
a.float() @ b.float(), converted to the output dtype, then the same check; the
ratios are against the faster route, and the three ops take the float32 route.
A 16-bit dtype takes only the float32 route where torch's CPU GEMM in it takes
seconds (float16 without AVX512-FP16/AMX-FP16, bfloat16 on an AVX2-only CPU;
the header records the time).
On a CPU with native bfloat16 GEMMs (AMX-BF16) our bfloat16
rows take the brgemm route (see matmul_unscale_check_cpu.cpp), and the three
ops take torch's bfloat16 matmul.
Weight-gradient shapes use a transposed view for `a`, as a Linear backward does.

    python benchmarks/bench_gemm.py [--device cpu|cuda] [--out PATH] [--reuse-memory]

--reuse-memory (CPU, glibc): serve every allocation from the heap and never
return freed memory to the kernel, so a fresh output reuses pages that are
already mapped, as a training loop's caching allocator would. By default glibc
maps each allocation above 32 MiB afresh, and page-faulting a fresh 64 MiB
output costs about as much as a third of the micro-batch GEMM here, paid by
ours and the baselines alike but not evenly from run to run. The header says
when a table was timed this way.
"""

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402
from benchmarks.common import (compare_rounds, cpu_matmul_seconds, header, markdown_table, median,  # noqa: E402
                               torch_unscale_check_, write_results)

CPU_CASES = [  # (name, M, N, K, transposed a)
    ("square 1024", 1024, 1024, 1024, False),
    ("square 2048", 2048, 2048, 2048, False),
    ("wgrad (4096x1024)^T (4096x1024)", 1024, 1024, 4096, True),
    # A micro-batch of 256 tokens: a large output for few FLOPs, where the
    # pass over the output that fusion saves matters most.
    ("wgrad (256x4096)^T (256x4096)", 4096, 4096, 256, True),
    # A training-sized weight gradient: 8192 tokens of a 4096-wide layer
    # (operands of 64-128 MiB, where first-touch page faults show).
    ("wgrad (8192x4096)^T (8192x4096)", 4096, 4096, 8192, True),
]
# On the GPU every case passes `a` as a transposed view: the layout of a Linear
# weight gradient, and the one the fused sm90 and sm80 kernels are instantiated for.
GPU_CASES = [
    ("4096^3, a = A^T view", 4096, 4096, 4096, True),
    ("8192^3, a = A^T view", 8192, 8192, 8192, True),
    ("wgrad (16384x4096)^T (16384x4096)", 4096, 4096, 16384, True),
]


def reuse_freed_memory():
    """glibc mallopt: M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to 1 GiB, before the
    benchmark allocates its tensors."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise SystemExit("--reuse-memory: glibc's mallopt refused the thresholds")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/gemm_<device class>.md)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--cases", default=None, help="run only the cases whose name contains this text")
    p.add_argument("--reuse-memory", action="store_true", help="CPU: keep freed memory mapped (see above)")
    args = p.parse_args(argv)
    dev = args.device
    if args.reuse_memory:
        if dev != "cpu":
            raise SystemExit("--reuse-memory is for the CPU (the CUDA caching allocator already reuses memory)")
        reuse_freed_memory()
    cases = GPU_CASES if dev == "cuda" else CPU_CASES
    cases = [c for c in cases if args.cases is None or args.cases in c[0]]
    dtypes = [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, None)]
    if dev == "cpu":
        dtypes = [(torch.float32, None), (torch.float16, torch.float32), (torch.float16, None),
                  (torch.bfloat16, torch.float32), (torch.bfloat16, None)]

    # torch's 16-bit CPU matmul takes seconds at 1024^3 where oneDNN does not run
    # it (float16 without AVX512-FP16/AMX-FP16; bfloat16 too on an AVX2-only CPU)
    # and milliseconds where it does: it is a baseline only where it is not
    # absurdly slow. The second call is timed.
    t_16bit = {}  # dtype -> seconds at 1024^3
    if dev == "cpu":
        t_16bit = {dt: cpu_matmul_seconds(dt) for dt in (torch.float16, torch.bfloat16)}
    native_16bit = {dt: t < 0.1 for dt, t in t_16bit.items()}
    half_native = native_16bit.get(torch.float16, False)

    rows = []
    for name, M, N, K, transposed in cases:
        for dtype, out_dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(K, M, generator=gen).to(dtype).to(dev).t() if transposed else \
                torch.randn(M, K, generator=gen).to(dtype).to(dev)
            b = torch.randn(K, N, generator=gen).to(dtype).to(dev)
            inv = torch.full((1,), 2.0**-16, device=dev)
            found = torch.zeros(1, device=dev)
            fp32_out = out_dtype == torch.float32 and dtype != torch.float32

            # The GEMM's product by each route: torch.matmul in the input dtype
            # ('native'; float32 output through cuBLAS's out_dtype on CUDA), and on
            # the CPU for 16-bit inputs the float32 route a user would take there.
            def native():
                if fp32_out and dev == "cuda":
                    return torch.mm(a, b, out_dtype=torch.float32)
                out = torch.matmul(a, b)
                return out.float() if fp32_out else out

            def via_fp32():
                return torch.matmul(a.float(), b.float()).to(out_dtype or dtype)

            def unfused_by(product):
                def run():
                    out = product()
                    torch_unscale_check_([out], found, inv)
                    return out
                return run

            def three_ops_by(product):
                def run():
                    out = product()
                    out.mul_(inv)
                    torch.maximum(found, (~torch.isfinite(out)).any().to(found.dtype), out=found)
                    return out
                return run

            def ours():
                return deepseek_ext.ops.matmul_unscale_check(a, b, inv, found, out_dtype=out_dtype)

            # Where torch's 16-bit CPU GEMM takes seconds (the header says how long)
            # that dtype's rows use the float32 route only.
            routes = {"native": native}
            if dev == "cpu" and dtype != torch.float32:
                routes = {"via fp32": via_fp32} if not native_16bit[dtype] \
                    else {"native": native, "via fp32": via_fp32}
            # The three ops run by the route a user would take: float32 on the CPU for 16-bit
            # inputs, except bfloat16 on a CPU with native bfloat16 GEMMs (AMX-BF16) and
            # float16 where torch's float16 matmul is fast (AVX512-FP16/AMX-FP16).
            bf16_native_cpu = dev == "cpu" and dtype == torch.bfloat16 and deepseek_ext._C.cpu_native_bf16_gemm()
            fp16_out_native_cpu = dev == "cpu" and dtype == torch.float16 and out_dtype is None \
                and deepseek_ext._C.cpu_native_fp16_gemm()
            fp16_native_cpu = dev == "cpu" and dtype == torch.float16 and half_native
            three_ops = three_ops_by(native if bf16_native_cpu or fp16_native_cpu else routes.get("via fp32", native))
            named = {"ours": ours, "three ops": three_ops}
            for label, product in routes.items():
                named[f"matmul {label}"] = product
                named[f"unfused {label}"] = unfused_by(product)
            # On CUDA, for a float32 output: 'matmul native' stays torch.matmul in the
            # input dtype (its usual output), cuBLAS's float32-output GEMM alone gets a
            # column of its own.
            extra_cols = dev == "cuda" and fp32_out
            if extra_cols:
                named["matmul native"] = lambda: torch.matmul(a, b)
                named["cuBLAS fp32-out"] = native
            per_round = dict(zip(named, compare_rounds(list(named.values()), dev, args.rounds, args.min_run_time)))
            t = {k: median(v) for k, v in per_round.items()}
            mm_keys = [k for k in t if k.startswith("matmul ")]
            unfused_keys = [k for k in t if k.startswith("unfused ")]

            def paired(num_keys, den_keys):
                """Per round, the time of the faster of num_keys over the faster of den_keys
                (the strongest baseline: the faster route of each), measured back to back:
                the median and the range over the rounds."""
                r = sorted(min(per_round[k][i] for k in num_keys) / min(per_round[k][i] for k in den_keys)
                           for i in range(args.rounds))
                return median(r), r[0], r[-1]

            ours_vs_mm = paired(["ours"], mm_keys)
            vs_unfused = paired(unfused_keys, ["ours"])
            vs_three = paired(["three ops"], ["ours"])
            flops = 2.0 * M * N * K
            # The route it really took, from the fused kernels' call counters.
            counters = (deepseek_ext._C.matmul_unscale_check_fused_sm90_calls,
                        deepseek_ext._C.matmul_unscale_check_fused_sm80_calls,
                        deepseek_ext._C.matmul_unscale_check_cpu_checks_from_inputs)
            before = [c() for c in counters]
            ours()
            took = [c() > n for c, n in zip(counters, before)]
            route = "fused sm90" if took[0] else "fused sm80" if took[1] else "BLAS + check of the inputs" if took[2] \
                else ("cuBLAS + epilogue" if dev == "cuda" else
                      "bf16 brgemm tiles + epilogue" if bf16_native_cpu
                      else "torch fp16 GEMM panels + check" if fp16_out_native_cpu
                      else "BLAS panels + epilogue")

            def tflops(key):
                return f"{flops / t[key] / 1e12:.3f}" if key in t else "-"

            row = [name, f"{str(dtype)[6:]} -> {str(out_dtype or dtype)[6:]}", route, tflops("matmul native"),
                   tflops("unfused native")]
            if dev == "cpu":
                row += [tflops("matmul via fp32"), tflops("unfused via fp32")]
            def ratio(r):
                return f"{r[0]:.3f} ({r[1]:.3f}-{r[2]:.3f})"

            row += [tflops("ours"), ratio(ours_vs_mm), ratio(vs_unfused), ratio(vs_three)]
            if dev == "cuda":
                row += [tflops("cuBLAS fp32-out")]
            rows.append(row)
            assert found.item() == 0.0
    cols = ["shape", "dtype", "route", "matmul TFLOP/s", "unfused TFLOP/s"]
    if dev == "cpu":
        cols += ["matmul via fp32 TFLOP/s", "unfused via fp32 TFLOP/s"]
    cols += ["ours TFLOP/s", "ours time / matmul time", "speedup vs unfused", "speedup vs three ops"]
    if dev == "cuda":
        cols += ["cuBLAS fp32-out TFLOP/s"]
    text = header("matmul_unscale_check vs torch.matmul and the unfused matmul + scale + check", dev)
    text += f"- built with the CUTLASS sm90 kernel: {getattr(deepseek_ext._C, 'with_cutlass_sm90', False)}\n"
    text += f"- built with the CUTLASS sm80 kernel: {getattr(deepseek_ext._C, 'with_cutlass_sm80', False)}"
    if dev == "cuda":
        text += f" (code for this GPU: {deepseek_ext._C.matmul_unscale_check_sm80_has_code_for(torch.cuda.current_device())})"
    text += "\n"
    for dt, t_dt in t_16bit.items():
        name = str(dt)[6:]
        if native_16bit[dt]:
            text += (f"- {name} rows also time torch's {name} matmul: one at 1024^3 took {t_dt:.3f} s here "
                     "(oneDNN runs it)\n")
        else:
            text += (f"- {name} rows time only the float32 route: one torch.matmul in {name} at 1024^3 took "
                     f"{t_dt:.2f} s here (not a baseline worth timing)\n")
    text += (f"- times: median over {args.rounds} alternating rounds (TFLOP/s columns); the last three columns "
             "are paired: per round, ours against the faster route of the baseline measured in the same round, "
             "median (lowest-highest) over the rounds; 'matmul' is torch.matmul in the input dtype "
             "(no scaling, no check); 'unfused' is matmul (fp32 output when asked) + "
             "torch._amp_foreach_non_finite_check_and_unscale_ (bfloat16 output on CUDA: the eager "
             "_foreach_norm(inf) + isfinite + _foreach_mul_, as torch's kernel rejects it)\n")
    text += ("- 'three ops': the matmul (on the CPU, for 16-bit inputs, by the float32 route, except "
             "bfloat16 on a CPU with native bfloat16 GEMMs and float16 where torch's float16 matmul is fast: "
             "torch.matmul in the input dtype), then "
             "out.mul_(inv_scale), then found_inf from torch.isfinite(out) ('matmul + mul + check' as "
             "separate ops; 'unfused' above is the stronger baseline)\n")
    if dev == "cpu":
        text += (f"- CPU with native bfloat16 GEMMs (AMX-BF16, oneDNN): "
                 f"{deepseek_ext._C.cpu_native_bf16_gemm()}; for a bfloat16 -> float32 row 'matmul' is "
                 "torch.matmul in bfloat16 then .float() (torch has no bfloat16 -> float32 CPU GEMM)\n")
        text += (f"- CPU where ours takes torch's float16 GEMM for float16 -> float16 (AVX512-FP16, oneDNN; "
                 f"inv_scale as alpha, then a check of each float16 panel): {deepseek_ext._C.cpu_native_fp16_gemm()}\n")
        text += ("- 'via fp32' (16-bit inputs): torch.matmul(a.float(), b.float()).to(output dtype), then the same "
                 "check for 'unfused'; the last two columns compare ours with the faster route of each baseline\n")
    if dev == "cuda":
        text += "- 'cuBLAS fp32-out' is torch.mm(a, b, out_dtype=torch.float32) alone (float32 outputs only)\n"
    if args.cases is not None:
        text += f"- only the cases whose name contains {args.cases!r} (--cases)\n"
    if args.reuse_memory:
        text += ("- --reuse-memory: glibc's mmap and trim thresholds at 1 GiB, so fresh tensors reuse pages "
                 "that are already mapped (no page faults after the first call)\n")
    text += "\n"
    text += markdown_table(cols, rows)
    print(text)
    print(f"written to {write_results('gemm', dev, text, args.out)}")


if __name__ == "__main__":
    main()
