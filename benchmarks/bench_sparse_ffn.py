"""Gated sparse FFN (GatedSparseFFN) forward + backward vs a dense FFN.

The baseline is the dense FFN a transformer would use: ``nn.Linear(d_model,
d_ff)``, the activation, ``nn.Linear(d_ff, d_model)``, same dtype and device,
timed in the same run in alternating rounds. For each density the table gives:

- sparse fwd+bwd: the whole module in training mode (gate GEMM, top-k +
  grouping, block-sparse FFN forward and backward, balancing-bias update), and
  its ratio to the dense FFN's fwd+bwd;
- routing: gate GEMM + top-k + grouping + gate weights, forward and backward,
  as a share of the dense FFN's fwd+bwd time;
- FLOPs: forward FFN FLOPs (gate included) over the dense FFN's (ffn_flops);
  the backward scales the same way.

    python benchmarks/bench_sparse_ffn.py [--device cpu|cuda] [--densities 0.1,0.3,0.5]
        [--tokens N --d-model D --d-ff F --dtype float32|bfloat16] [--threads N] [--rounds R] [--out PATH]

Defaults: CPU 4096 tokens, d_model 512, d_ff 2048, float32; CUDA (the GPU check)
16384 tokens, d_model 4096, d_ff 16384, bfloat16.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402,F401
from benchmarks.common import compare_seconds, header, markdown_table, write_results  # noqa: E402
from deepseek_ext.nn import GatedSparseFFN, ffn_flops  # noqa: E402

_ACT = {"gelu": nn.GELU, "silu": nn.SiLU}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--densities", default="0.1,0.3,0.5")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--d-ff", type=int, default=None)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--activation", default="gelu", choices=sorted(_ACT))
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", default=None, help="comma-separated torch CPU thread counts to run, "
                   "e.g. 1,2 (default: torch's current count)")
    p.add_argument("--profile", type=float, default=None, metavar="DENSITY",
                   help="after the table, profile two sparse steps at this density and list the ops "
                        "by device time (where the sparse step's time goes)")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/sparse_ffn_<device class>.md)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    args = p.parse_args(argv)
    dev = args.device
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    gpu = dev == "cuda"
    T = args.tokens or (16384 if gpu else 4096)
    D = args.d_model or (4096 if gpu else 512)
    Fh = args.d_ff or (16384 if gpu else 2048)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    bs, act = args.block_size, args.activation
    densities = [float(d) for d in args.densities.split(",")]

    torch.manual_seed(0)
    x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, D, device=dev, dtype=dtype)
    dense = nn.Sequential(nn.Linear(D, Fh), _ACT[act](), nn.Linear(Fh, D)).to(dev, dtype)

    def dense_step():
        dense(x).backward(grad)

    rows = []
    for threads, density in [(t, d) for t in thread_counts for d in densities]:
        torch.set_num_threads(threads)
        ffn = GatedSparseFFN(D, Fh, block_size=bs, density=density, activation=act).to(dev, dtype)
        ffn.train()
        fl = ffn_flops(D, Fh, block_size=bs, density=density, activation=act)

        def sparse_step():
            ffn(x).backward(grad)

        def routing_step():
            scores, _, _, _, gate = ffn.route(x)
            gate.backward(torch.ones_like(gate))

        ts = compare_seconds([dense_step, sparse_step, routing_step], dev, rounds=args.rounds,
                             min_run_time=args.min_run_time)
        t_dense, t_sparse, t_route = ts
        ratio, route_share = t_sparse / t_dense, t_route / t_dense
        rows.append([threads, f"{density:g}", f"{fl['k']}/{fl['n_blocks']}", f"{t_dense * 1e3:.1f}",
                     f"{t_sparse * 1e3:.1f}", f"{ratio:.2f}x", f"{t_route * 1e3:.2f}",
                     f"{100 * route_share:.1f}%", f"{fl['ratio']:.3f}", f"{100 * fl['saved']:.1f}%"])
        print(rows[-1], flush=True)

    title = "Gated sparse FFN: forward + backward vs dense FFN"
    text = header(title, dev)
    if args.threads:
        text += f"- torch threads: per row, {args.threads} (--threads), not the machine line's count\n"
    text += (f"- shape: {T} tokens, d_model {D}, d_ff {Fh}, block_size {bs}, {act}, "
             f"{str(dtype).replace('torch.', '')}\n"
             f"- dense: nn.Linear + {_ACT[act].__name__} + nn.Linear; sparse: GatedSparseFFN "
             f"(train mode, bias update included); median of {args.rounds} alternating rounds\n\n")
    text += markdown_table(["threads", "density", "blocks/token", "dense ms", "sparse ms", "sparse / dense",
                            "routing ms", "routing / dense", "FLOPs ratio", "FLOPs saved"], rows)
    if args.profile is not None:
        text += "\n" + profile_sparse_step(x, grad, D, Fh, bs, args.profile, act, dev, dtype)
    print(text)
    path = write_results("sparse_ffn", dev, text, args.out)
    print(f"wrote {path}")


def profile_sparse_step(x, grad, D, Fh, bs, density, act, dev, dtype, top=12):
    """Two forward + backward steps under torch.profiler: the ops with the most
    device time (self time, so nested ops are not counted twice), as a table."""
    from torch.profiler import ProfilerActivity, profile

    ffn = GatedSparseFFN(D, Fh, block_size=bs, density=density, activation=act).to(dev, dtype)
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
    # nothing is counted twice (the first GPU table divided by both, halving every share).
    kernels = [e for e in events if not gpu or getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    total = sum(key(e) for e in (kernels or events))
    rows = [[e.key[:60], e.count // 2, f"{key(e) / 2e3:.2f}", f"{100 * key(e) / total:.1f}%"] for e in events[:top]]
    what = "device" if gpu else "CPU"
    note = "; share: of all kernels' device time, and an op's row includes its kernels" if gpu else ""
    return (f"## Where a sparse step's time goes (density {density:g}, self {what} time per step, "
            f"top {top} of {len(events)} ops; torch.profiler{note})\n\n" +
            markdown_table(["op", "calls / step", "ms / step", "share"], rows))


if __name__ == "__main__":
    main()
