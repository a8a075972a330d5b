"""Gated sparse FFN (GatedSparseFFN) forward + backward vs a dense FFN, and
where the sparse step's time goes.

The baseline is the dense FFN a transformer would use: ``nn.Linear(d_model,
d_ff)``, the activation, ``nn.Linear(d_ff, d_model)``, same dtype and device,
timed in the same run in alternating rounds. Per shape and block count:

- sparse fwd+bwd: the whole module in training mode (gate GEMM, routing,
  block-sparse FFN forward and backward, balancing-bias update), and its ratio
  to the dense FFN's fwd+bwd;
- routing: gate GEMM + top-k + grouping + gate weights, forward and backward,
  as a share of the dense FFN's fwd+bwd time;
- FLOPs: forward FFN FLOPs (gate included) over the dense FFN's (ffn_flops);
  the backward scales the same way;
- on CUDA, peak memory of a sparse step over a dense one's (the parameters,
  input and output gradient excluded from both).

A second table times the building blocks of the sparse step on their own, as
the CUDA path runs them (the CPU kernel runs the same row movers in tiles and
per-block GEMMs): the gather of x's rows in block order and the combine back
to tokens in GB/s (bytes read + written), and on CUDA each grouped GEMM
(torch._grouped_mm) in TFLOP/s.

    python benchmarks/bench_sparse_ffn.py [--device cpu|cuda] [--densities 0.3]
        [--shapes T,D,F;...] [--n-blocks N] [--dtype float32|bfloat16] [--threads N]
        [--rounds R] [--profile DENSITY] [--out PATH]

Defaults: CPU float32, (4096 tokens, d_model 512, d_ff 2048) and the demo's
FFN (2048 tokens, 256, 1024), densities 0.1, 0.3, 0.5; CUDA bfloat16, density
0.3, the shapes of the GPU targets (16384, 4096, 16384), (32768, 8192, 32768)
and (8192, 2048, 8192), plus a 128-wide-block row at the first shape (the
regression line).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402,F401
from benchmarks.common import compare_seconds, header, markdown_table, median_seconds, write_results  # noqa: E402
from deepseek_ext import ops  # noqa: E402
from deepseek_ext.nn import GatedSparseFFN, ffn_flops  # noqa: E402
from deepseek_ext.nn.sparse_ffn import DEFAULT_N_BLOCKS  # noqa: E402

_ACT = {"gelu": nn.GELU, "silu": nn.SiLU}
CPU_SHAPES = "4096,512,2048;2048,256,1024"
GPU_SHAPES = "16384,4096,16384;32768,8192,32768;8192,2048,8192"


def peak_bytes(fn, dev) -> int:
    """Peak CUDA memory allocated during fn() above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--densities", default=None, help="comma-separated (default CPU 0.1,0.3,0.5; CUDA 0.3)")
    p.add_argument("--shapes", default=None, help="tokens,d_model,d_ff;... (defaults: see the module doc)")
    p.add_argument("--n-blocks", type=int, default=DEFAULT_N_BLOCKS)
    p.add_argument("--no-block-128-row", action="store_true",
                   help="leave out the 128-wide-block regression row (CUDA)")
    p.add_argument("--activation", default="gelu", choices=sorted(_ACT))
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", default=None, help="comma-separated torch CPU thread counts to run, "
                   "e.g. 1,2 (default: torch's current count)")
    p.add_argument("--profile", type=float, default=None, metavar="DENSITY",
                   help="after the tables, profile two sparse steps at this density (first shape) and "
                        "list the ops by device time")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/sparse_ffn_<device class>.md)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    args = p.parse_args(argv)
    dev = args.device
    gpu = dev == "cuda"
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    shapes = [tuple(int(v) for v in s.split(",")) for s in (args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES)).split(";")]
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    densities = [float(d) for d in (args.densities or ("0.3" if gpu else "0.1,0.3,0.5")).split(",")]
    act = args.activation

    rows, part_rows = [], []
    for si, (T, D, Fh) in enumerate(shapes):
        torch.manual_seed(0)
        x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
        grad = torch.randn(T, D, device=dev, dtype=dtype)
        dense = nn.Sequential(nn.Linear(D, Fh), _ACT[act](), nn.Linear(Fh, D)).to(dev, dtype)

        def dense_step():
            dense(x).backward(grad)

        block_counts = [args.n_blocks]
        if gpu and si == 0 and not args.no_block_128_row and Fh // 128 != args.n_blocks:
            block_counts.append(Fh // 128)
        for threads, nb, density in [(t, n, d) for t in thread_counts for n in block_counts for d in densities]:
            torch.set_num_threads(threads)
            ffn = GatedSparseFFN(D, Fh, n_blocks=nb, density=density, activation=act).to(dev, dtype)
            ffn.train()
            fl = ffn_flops(D, Fh, n_blocks=nb, density=density, activation=act)

            def sparse_step():
                ffn(x).backward(grad)

            def routing_step():
                scores, _, _, _, gate = ffn.route(x)
                gate.backward(torch.ones_like(gate))

            t_dense, t_sparse, t_route = compare_seconds([dense_step, sparse_step, routing_step], dev,
                                                         rounds=args.rounds, min_run_time=args.min_run_time)
            row = [f"{T}x{D}x{Fh}", threads, f"{nb} x {Fh // nb}", f"{density:g}", f"{fl['k']}/{nb}",
                   f"{t_dense * 1e3:.2f}", f"{t_sparse * 1e3:.2f}", f"{t_sparse / t_dense:.2f}x",
                   f"{t_route * 1e3:.3f}", f"{100 * t_route / t_dense:.1f}%", f"{fl['ratio']:.3f}"]
            if gpu:
                # x.grad is allocated again in both (parameter gradients exist already).
                x.grad = None
                mem_dense = peak_bytes(dense_step, dev)
                x.grad = None
                mem_sparse = peak_bytes(sparse_step, dev)
                row.append(f"{mem_sparse / mem_dense:.2f}x")
            rows.append(row)
            print(row, flush=True)
            if nb == args.n_blocks and abs(density - 0.3) < 1e-9 and threads == thread_counts[-1]:
                part_rows += time_parts(x.detach(), ffn, dev, args.min_run_time)
            del ffn
        del x, grad, dense
        if gpu:
            torch.cuda.empty_cache()

    title = "Gated sparse FFN: forward + backward vs dense FFN"
    text = header(title, dev)
    if args.threads:
        text += f"- torch threads: per row, {args.threads} (--threads), not the machine line's count\n"
    text += (f"- {act}, {str(dtype).replace('torch.', '')}; shape: tokens x d_model x d_ff; blocks: n_blocks x "
             f"width\n- dense: nn.Linear + {_ACT[act].__name__} + nn.Linear; sparse: GatedSparseFFN (train mode, "
             f"bias update included); median of {args.rounds} alternating rounds"
             + ("; peak memory: of a step, parameters excluded" if gpu else "") + "\n\n")
    columns = ["shape", "threads", "blocks", "density", "blocks/token", "dense ms", "sparse ms", "sparse / dense",
               "routing ms", "routing / dense", "FLOPs ratio"] + (["peak memory / dense"] if gpu else [])
    text += markdown_table(columns, rows)
    text += ("\n## The sparse step's building blocks, one call each (density 0.3, "
             f"{args.n_blocks} blocks)\n\n")
    text += markdown_table(["shape", "part", "rows x columns", "ms", "rate"], part_rows)
    if args.profile is not None:
        T, D, Fh = shapes[0]
        x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
        grad = torch.randn(T, D, device=dev, dtype=dtype)
        text += "\n" + profile_sparse_step(x, grad, D, Fh, args.n_blocks, args.profile, act, dev, dtype)
    print(text)
    path = write_results("sparse_ffn", dev, text, args.out)
    print(f"wrote {path}")


def rate(value: float, unit: str) -> str:
    return f"{value:.0f} {unit}" if value >= 10 else f"{value:.2f} {unit}"


def time_parts(x, ffn, dev, min_run_time):
    """Rows (shape, part, size, ms, GB/s or TFLOP/s) for the gather, the combine
    and, on CUDA, the six grouped GEMMs of one forward + backward, with the
    module's routing of x."""
    T, D = x.shape
    nb, bs, k = ffn.n_blocks, ffn.block_size, ffn.k
    mb = ffn.w1.shape[0] // nb
    shape = f"{T}x{D}x{ffn.d_ff}"
    with torch.no_grad():
        _, _, order, offsets, gate = ffn.route(x)
        gate = gate.to(x.dtype)
        P = order.numel()
        xs = ops.sparse_ffn_gather(x, order, k)
        y = torch.randn(P, D, device=x.device, dtype=x.dtype)
    esize = x.element_size()
    rows = []

    def timed(fn):
        return median_seconds(fn, dev, min_run_time=min_run_time)

    t = timed(lambda: ops.sparse_ffn_gather(x, order, k))
    rows.append([shape, "gather x rows (sparse_ffn_gather)", f"{P} x {D}", f"{t * 1e3:.3f}",
                 rate(2 * P * D * esize / t / 1e9, "GB/s")])
    t = timed(lambda: ops.sparse_ffn_combine(y, order, k, gate))
    rows.append([shape, "combine to tokens (sparse_ffn_combine)", f"{P} x {D} -> {T}", f"{t * 1e3:.3f}",
                 rate((P + T) * D * esize / t / 1e9, "GB/s")])
    if x.is_cuda:
        ends = offsets[1:].to(torch.int32)
        w1 = ffn.w1.detach().view(nb, mb, D)
        w2 = ffn.w2.detach().view(nb, bs, D)
        a = torch.randn(P, mb, device=x.device, dtype=x.dtype)
        h = torch.randn(P, bs, device=x.device, dtype=x.dtype)
        gemms = [
            ("fwd GEMM1 x_s @ w1_b^T", lambda: torch._grouped_mm(xs, w1.transpose(1, 2), ends), P * D * mb),
            ("fwd GEMM2 h @ w2_b", lambda: torch._grouped_mm(h, w2, ends), P * bs * D),
            ("bwd dgrad dy @ w2_b^T", lambda: torch._grouped_mm(y, w2.transpose(1, 2), ends), P * D * bs),
            ("bwd wgrad w2: h^T @ dy", lambda: torch._grouped_mm(h.t(), y, ends), P * bs * D),
            ("bwd wgrad w1: da^T @ x_s", lambda: torch._grouped_mm(a.t(), xs, ends), P * mb * D),
            ("bwd dgrad da @ w1_b", lambda: torch._grouped_mm(a, w1, ends), P * mb * D),
        ]
        for name, fn, macs in gemms:
            t = timed(fn)
            rows.append([shape, name, f"{nb} groups, {P} rows", f"{t * 1e3:.3f}", rate(2 * macs / t / 1e12, "TFLOP/s")])
    return rows


def profile_sparse_step(x, grad, D, Fh, nb, density, act, dev, dtype, top=12):
    """Two forward + backward steps under torch.profiler: the ops with the most
    device time (self time, so nested ops are not counted twice), as a table."""
    from torch.profiler import ProfilerActivity, profile

    ffn = GatedSparseFFN(D, Fh, n_blocks=nb, density=density, activation=act).to(dev, dtype)
    ffn.train()
    for _ in range(2):  # warm-up
        ffn(x).backward(grad)
    gpu = dev == "cuda"
    if gpu:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            ffn(x).backward(grad)
        if gpu:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.self_device_time_total if gpu else e.self_cpu_time_total) > 0]
    key = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    events.sort(key=key, reverse=True)
    # On the GPU an op row (aten::gather) carries its kernels' time and the
    # kernels have rows of their own: the share is of the kernels' total, so
    # nothing is counted twice.
    kernels = [e for e in events if not gpu or getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    total = sum(key(e) for e in (kernels or events))
    rows = [[e.key[:60], e.count // 2, f"{key(e) / 2e3:.2f}", f"{100 * key(e) / total:.1f}%"] for e in events[:top]]
    what = "device" if gpu else "CPU"
    note = "; share: of all kernels' device time, and an op's row includes its kernels" if gpu else ""
    return (f"## Where a sparse step's time goes ({x.shape[0]}x{D}x{Fh}, {nb} blocks, density {density:g}, "
            f"self {what} time per step, top {top} of {len(events)} ops; torch.profiler{note})\n\n" +
            markdown_table(["op", "calls / step", "ms / step", "share"], rows))


if __name__ == "__main__":
    main()
