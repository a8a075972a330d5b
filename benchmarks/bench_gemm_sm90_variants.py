"""Other CUTLASS configurations of the fused sm90 GEMM, timed against the library's.

The library's fused weight-gradient GEMM (kernels/matmul_unscale_check_sm90.cu)
uses cooperative 128x256x64 tiles with 2x1 clusters and a persistent
scheduler. This script builds the same kernel template
(kernels/matmul_unscale_check_sm90.cuh) with other schedules and tiles
(benchmarks/gpu/sm90_variants/, compiled here for sm_90a through
torch.utils.cpp_extension, in parallel), checks every variant against cuBLAS
(relative error, every output element written, found_inf left at 0), then
times, in alternating rounds on the same inputs:
  * torch.matmul in the input dtype (cuBLAS, no scaling, no check),
  * the unfused sequence: torch.mm(..., out_dtype=float32) + torch's unscale pass,
  * the library's op (deepseek_ext.ops.matmul_unscale_check),
  * each variant.
Needs an sm_90 GPU, nvcc and the CUTLASS headers (third_party/cutlass from
`make gpu-prep`, or $DEEPSEEK_EXT_CUTLASS_DIR). Not part of the library build.

    python benchmarks/bench_gemm_sm90_variants.py [--out DIR] [--rounds 3]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import deepseek_ext  # noqa: E402
from benchmarks.common import compare_seconds, header, markdown_table, torch_unscale_check_, write_results  # noqa: E402

VARIANTS = ["pingpong_64x256_2x1", "pingpong_128x128_2x1", "coop_256x128_1x2", "coop_128x256_2x1_streamk",
            "coop_128x256_1x2", "coop_128x256_2x2"]
CASES = [  # (name, M, N, K): a = A^T view of a [K, M] tensor, b = [K, N], as in a Linear weight gradient
    ("4096^3", 4096, 4096, 4096),
    ("8192^3", 8192, 8192, 8192),
    ("wgrad (16384x4096)^T (16384x4096)", 4096, 4096, 16384),
]


def build():
    from torch.utils.cpp_extension import load

    cutlass = os.environ.get("DEEPSEEK_EXT_CUTLASS_DIR") or str(ROOT / "third_party" / "cutlass" / "include")
    if not (Path(cutlass) / "cutlass" / "cutlass.h").exists():
        raise SystemExit(f"CUTLASS headers not found in {cutlass} (run `make gpu-prep`)")
    src = ROOT / "benchmarks" / "gpu" / "sm90_variants"
    build_dir = ROOT / "build" / "sm90_variants"
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return load(
        name="dsx_sm90_variants",
        sources=[str(src / "bindings.cpp")] + [str(src / f"{v}.cu") for v in VARIANTS],
        extra_include_paths=[str(ROOT / "kernels"), str(ROOT / "csrc" / "include"), cutlass],
        extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                           "-gencode=arch=compute_90a,code=sm_90a"],
        build_directory=str(build_dir),
        verbose=False,
    )


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda"], help="the GPU check passes it to every benchmark")
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--build-only", action="store_true", help="compile the variants and exit (no GPU needed)")
    args = p.parse_args(argv)
    if args.build_only:
        build()
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("needs an sm_90 GPU (H100/H200)")
    ext = build()
    dev = "cuda"
    rows, data = [], []
    for name, M, N, K in CASES:
        for dtype in (torch.float16, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(K, M, generator=gen).to(dtype).to(dev).t()
            b = torch.randn(K, N, generator=gen).to(dtype).to(dev)
            inv = torch.full((1,), 2.0**-4, device=dev)
            found = torch.zeros(1, device=dev)
            ref = torch.mm(a, b, out_dtype=torch.float32) * inv
            flops = 2.0 * M * N * K

            def matmul_alone():
                return torch.matmul(a, b)

            def unfused():
                out = torch.mm(a, b, out_dtype=torch.float32)
                torch_unscale_check_([out], found, inv)
                return out

            def library():
                return deepseek_ext.ops.matmul_unscale_check(a, b, inv, found, out_dtype=torch.float32)

            fns, names, errs = [matmul_alone, unfused, library], ["cuBLAS matmul", "unfused", "library"], {}
            errs["library"] = rel_err(library(), ref)
            for v in VARIANTS:
                out = torch.full((M, N), float("nan"), device=dev)  # every element must be written
                if not getattr(ext, v)(a, b, inv, found, out):
                    errs[v] = "declined"
                    continue
                torch.cuda.synchronize()
                errs[v] = rel_err(out, ref) if not out.isnan().any() else float("nan")

                def run(v=v, out=out):
                    getattr(ext, v)(a, b, inv, found, out)
                    return out

                fns.append(run)
                names.append(v)
            times = compare_seconds(fns, dev, args.rounds, args.min_run_time)
            t = dict(zip(names, times))
            for v in ["library"] + VARIANTS:
                if v not in t:
                    rows.append([name, str(dtype)[6:], v, "-", "-", "-", errs.get(v, "-")])
                    continue
                err = errs[v]
                rows.append([name, str(dtype)[6:], v, f"{flops / t[v] / 1e12:.1f}",
                             f"{t['cuBLAS matmul'] / t[v]:.3f}", f"{t['unfused'] / t[v]:.3f}",
                             f"{err:.1e}" if isinstance(err, float) else err])
                data.append(dict(case=name, M=M, N=N, K=K, dtype=str(dtype), variant=v, seconds=t[v],
                                 matmul_s=t["cuBLAS matmul"], unfused_s=t["unfused"], rel_err=err))
            assert found.item() == 0.0, "benchmark inputs must stay finite"
            print(f"{name} {dtype}: matmul {flops / t['cuBLAS matmul'] / 1e12:.1f}, "
                  f"unfused {flops / t['unfused'] / 1e12:.1f}, " +
                  ", ".join(f"{v} {flops / t[v] / 1e12:.1f}" for v in names[2:]) + " TFLOP/s", flush=True)
    text = header("Fused sm90 GEMM: CUTLASS configurations vs the library's", dev)
    text += (f"- library: cooperative 128x256x64, cluster 2x1, persistent (128x128 below one wave of tiles)\n"
             f"- times: median over {args.rounds} alternating rounds; float32 output; rel err: "
             "||out - ref|| / ||ref|| against cuBLAS (float32 output, scaled); 'declined': CUTLASS "
             "cannot run that configuration on the shape\n\n")
    text += markdown_table(["shape", "dtype", "kernel", "TFLOP/s", "x cuBLAS matmul", "x unfused", "rel err"], rows)
    print(text)
    print(f"written to {write_results('gemm_sm90_variants', dev, text, data, args.out)}")


if __name__ == "__main__":
    main()
