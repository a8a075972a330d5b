"""unscale_and_check_ vs torch._amp_foreach_non_finite_check_and_unscale_.

The gradient set is the parameter list of a GPT-2-small-sized model (124M
parameters, 148 tensors). Both ops run in one process on the same tensors:
the "unscale" path multiplies by inv_scale != 1 (read + write), the
"check-only" path passes inv_scale == 1 (our op then only reads). GB/s counts
the bytes the work needs (unscale: read + write, check-only: read), the same
for both ops, so the ratio of GB/s is the ratio of times. On CUDA the table
also gives each op's bandwidth as a share of a measured device-to-device copy.
torch's CUDA kernel rejects bfloat16: there the baseline is the eager
composition in benchmarks/common.py (torch_unscale_check_).

    python benchmarks/bench_unscale.py [--device cpu|cuda] [--out PATH]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402
from benchmarks.common import (compare_seconds, header, markdown_table, median_seconds,  # noqa: E402
                               torch_unscale_check_, write_results)


def gpt_small_shapes(vocab=50257, ctx=1024, d=768, layers=12):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/unscale_<device class>.md)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    args = p.parse_args(argv)
    dev = args.device
    shapes = gpt_small_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)

    copy_gbs = None
    if dev == "cuda":
        src = torch.empty(numel, device=dev)
        dst = torch.empty_like(src)
        t = median_seconds(lambda: dst.copy_(src), dev, args.min_run_time)
        copy_gbs = 2 * src.numel() * 4 / t / 1e9
        del src, dst

    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(s, generator=gen).to(dtype).to(dev) for s in shapes]
        nbytes = numel * grads[0].element_size()
        found = torch.zeros(1, device=dev)
        # 1 + 2^-20 != 1, so the unscale path reads and writes; applied tens of
        # thousands of times (a GPU run's count) it grows float32 values by a few
        # percent and leaves float16/bfloat16 values unchanged (the product rounds
        # back), so nothing overflows or drifts into (slow) subnormals. (1 + 2^-10
        # overflowed float16 gradients in the first H200 run.)
        for path, s_val, traffic in (("unscale", 1.0 + 2.0**-20, 2), ("check-only", 1.0, 1)):
            s = torch.full((1,), s_val, device=dev)
            t_torch, t_ours = compare_seconds(
                [lambda: torch_unscale_check_(grads, found, s),
                 lambda: deepseek_ext.ops.unscale_and_check_(grads, found, s)],
                dev, rounds=args.rounds, min_run_time=args.min_run_time)
            gbs_torch = traffic * nbytes / t_torch / 1e9
            gbs_ours = traffic * nbytes / t_ours / 1e9
            row = [str(dtype).replace("torch.", ""), path, f"{t_torch * 1e3:.3f}", f"{t_ours * 1e3:.3f}",
                   f"{gbs_torch:.1f}", f"{gbs_ours:.1f}", f"{t_torch / t_ours:.2f}"]
            if copy_gbs:
                row.append(f"{100 * gbs_ours / copy_gbs:.0f}%")
            rows.append(row)
        assert found.item() == 0.0, "benchmark gradients must stay finite"
        del grads

    cols = ["grads", "path", "torch ms", "ours ms", "torch GB/s", "ours GB/s", "speedup (torch/ours)"]
    if copy_gbs:
        cols.append("ours % of copy BW")
    text = header("unscale_and_check_ vs torch._amp_foreach_non_finite_check_and_unscale_", dev)
    text += f"- gradient set: GPT-2 small, {len(shapes)} tensors, {numel / 1e6:.1f}M elements\n"
    if copy_gbs:
        text += f"- measured device-to-device copy: {copy_gbs:.0f} GB/s (read + write)\n"
    if dev == "cuda":
        text += ("- bfloat16 on CUDA: torch's fused kernel rejects it; 'torch' is the eager composition "
                 "_foreach_norm(inf) + isfinite + _foreach_mul_ (benchmarks/common.py)\n")
    text += f"- times: median over {args.rounds} alternating rounds of torch.utils.benchmark medians; GB/s = bytes needed (unscale 2x, check-only 1x) / time\n\n"
    text += markdown_table(cols, rows)
    print(text)
    path = write_results("unscale", dev, text, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
