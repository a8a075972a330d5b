"""int8 gradient quantisation ops vs torch eager compositions and a plain copy.

For every size and input dtype, each op is timed in alternating rounds beside
(a) the same computation written with torch eager ops (below: ``eager_*``) and
(b) ``torch.clone`` of the input tensor, the copy bandwidth of the machine.
GB/s counts the bytes the op has to move (inputs read once + outputs written
once), the same count for ours and eager, so "x eager" is the ratio of times;
"% of clone" is our GB/s over clone's GB/s (clone moves 2 x the input's bytes).
clone allocates its output, as our ops do; for sizes past the allocator's
mmap threshold (32 MiB in glibc) each call then pays page faults for fresh
pages, so "% of copy" also gives our GB/s over ``dst.copy_(x)`` into a
preallocated ``dst`` -- the pure memory bandwidth, a stricter bar.
With ``THP_MEM_ALLOC_ENABLE=1`` in the environment torch's CPU allocator asks
for transparent huge pages for large tensors (2 MiB pages: 512x fewer faults);
the header records which setting a table was timed with.

Ops (n = size, b = bytes per element of the dtype, nb = n / block_size):
  quantize       x[n] -> q, scales                       reads n*b, writes n + 4nb
  quantize_sr    the same with stochastic rounding
  quantize_ef    x[n] + residual[n] fp32 -> q, scales, residual  reads n*b + 4n, writes n + 4nb + 4n
  dequantize     q, scales -> [n] of the dtype            reads n + 4nb, writes n*b
  dequant_reduce q [W, n/W], scales -> [n/W] of the dtype reads n + 4nb, writes n/W*b

bitsandbytes' quantize_blockwise (same block size; its 8-bit dynamic map, not
linear int8) is timed on the quantize rows too when it is importable, on CPU
and CUDA alike (bitsandbytes 0.50 runs on the CPU); otherwise it is skipped
with a note. The header records its version.

    python benchmarks/bench_quant.py [--device cpu|cuda] [--sizes 1M,8M,64M] [--out PATH]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402
from benchmarks.common import compare_seconds, header, markdown_table, write_results  # noqa: E402

ops = deepseek_ext.ops


# ---- the same computations in torch eager ops (sizes are multiples of block_size)

_CONSTS = {}


def _const(v, device):
    key = (v, str(device))
    if key not in _CONSTS:
        _CONSTS[key] = torch.full((), v, device=device)
    return _CONSTS[key]


def eager_quantize(x, bs, stochastic=False):
    yb = x.reshape(-1, bs).float()
    # A tensor divisor: CUDA torch turns division by a Python scalar into a multiplication
    # by its reciprocal, which is not the correctly rounded quotient our op computes.
    scale = yb.abs().amax(dim=1) / _const(127.0, x.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    v = yb / safe
    r = torch.floor(v + torch.rand_like(v)) if stochastic else torch.round(v)
    return r.clamp_(-127, 127).to(torch.int8).view(-1), scale


def eager_quantize_ef(x, residual, bs):
    y = x.reshape(-1).float() + residual
    q, scale = eager_quantize(y, bs)
    residual.copy_(y - (q.view(-1, bs).float() * scale.unsqueeze(1)).view(-1))
    return q, scale


def eager_dequantize(q, scales, bs, dtype):
    return (q.view(-1, bs).float() * scales.unsqueeze(1)).to(dtype).view(-1)


def eager_dequantize_reduce(q, scales, bs, multiplier, dtype):
    W = q.shape[0]
    terms = q.view(W, -1, bs).float() * scales.unsqueeze(2)
    return (terms.sum(0) * multiplier).to(dtype).view(-1)


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="comma-separated element counts, e.g. 1M,8M,64M "
                   "(default: 1M,8M,64M on CPU, 1M,16M,256M on CUDA)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--world", type=int, default=8, help="W, ranks summed by dequant_reduce")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/quant_<device class>.md)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    args = p.parse_args(argv)
    dev, bs, W = args.device, args.block_size, args.world
    default_sizes = "1M,8M,64M" if dev == "cpu" else "1M,16M,256M"
    sizes = [parse_size(s) for s in (args.sizes or default_sizes).split(",")]
    for n in sizes:
        if n % (bs * W):
            raise SystemExit(f"size {n} must be a multiple of block_size * world = {bs * W}")

    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf  # noqa: F401
        bnb_note = None
        bnb_version = bitsandbytes.__version__
    except Exception as e:  # not installed, or no usable binary
        bnbf = None
        bnb_note = f"bitsandbytes not importable ({type(e).__name__}: {e}); its quantize_blockwise was skipped"
    print(f"bitsandbytes: {bnb_note or 'imported, compared on quantize'}", flush=True)

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        b = torch.tensor([], dtype=dtype).element_size()
        for n in sizes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, generator=gen).to(dtype).to(dev)
            nb = n // bs
            residual = (torch.randn(n, generator=gen) * 1e-3).to(dev)
            residual_e = residual.clone()
            q, scales = ops.quantize_int8(x, bs)
            qw = q.view(W, n // W)
            sw = scales.view(W, nb // W)
            cases = {
                "quantize": (lambda: ops.quantize_int8(x, bs), lambda: eager_quantize(x, bs),
                             n * b + n + 4 * nb),
                "quantize_sr": (lambda: ops.quantize_int8(x, bs, True, 1, 0),
                                lambda: eager_quantize(x, bs, True), n * b + n + 4 * nb),
                "quantize_ef": (lambda: ops.quantize_int8_ef_(x, residual, bs),
                                lambda: eager_quantize_ef(x, residual_e, bs),
                                n * b + 4 * n + n + 4 * nb + 4 * n),
                "dequantize": (lambda: ops.dequantize_int8(q, scales, bs, dtype),
                               lambda: eager_dequantize(q, scales, bs, dtype), n + 4 * nb + n * b),
                "dequant_reduce": (lambda: ops.dequantize_reduce_int8(qw, sw, bs, 1.0 / W, dtype),
                                   lambda: eager_dequantize_reduce(qw, sw, bs, 1.0 / W, dtype),
                                   n + 4 * nb + (n // W) * b),
            }
            # The eager compositions compute the same values (RNE paths):
            assert torch.equal(eager_quantize(x, bs)[0], q)
            torch.testing.assert_close(eager_dequantize(q, scales, bs, dtype), ops.dequantize_int8(q, scales, bs, dtype))
            for name, (ours, eager, nbytes) in cases.items():
                dst = torch.empty_like(x)
                fns = [lambda: torch.clone(x), lambda: dst.copy_(x), eager, ours]
                extra = None
                if bnbf is not None and name == "quantize":
                    try:
                        bnbf.quantize_blockwise(x, blocksize=bs)
                        fns.append(lambda: bnbf.quantize_blockwise(x, blocksize=bs))
                    except Exception as e:  # e.g. a dtype or block size it does not take
                        print(f"bitsandbytes quantize_blockwise failed on {dtype}: {e}", flush=True)
                ts = compare_seconds(fns, dev, rounds=args.rounds, min_run_time=args.min_run_time)
                t_clone, t_copy, t_eager, t_ours = ts[:4]
                clone_gbs = 2 * n * b / t_clone / 1e9
                copy_gbs = 2 * n * b / t_copy / 1e9
                gbs = nbytes / t_ours / 1e9
                label = f"{n / 2**20:.0f}M" if n >= 2**20 else f"{n / 2**10:.0f}K"
                row = [name, str(dtype).replace("torch.", ""), label, f"{t_ours * 1e3:.3f}",
                       f"{gbs:.1f}", f"{t_eager * 1e3:.3f}", f"{t_eager / t_ours:.1f}x",
                       f"{clone_gbs:.1f}", f"{100 * gbs / clone_gbs:.0f}%",
                       f"{copy_gbs:.1f}", f"{100 * gbs / copy_gbs:.0f}%"]
                if len(ts) > 4:
                    extra = ts[4]
                row.append(f"{extra / t_ours:.2f}x" if extra else "-")
                rows.append(row)
                print(" | ".join(row), flush=True)
            del x, residual, residual_e, q, scales, qw, sw, dst

    cols = ["op", "input", "numel", "ours ms", "ours GB/s", "eager ms", "x eager",
            "clone GB/s", "% of clone", "copy_ GB/s", "% of copy_", "x bnb"]
    text = header("int8 gradient quantisation vs torch eager and copy bandwidth", dev)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    if dev == "cpu":
        text += (f"- THP_MEM_ALLOC_ENABLE={'1' if thp else 'unset'}: torch's CPU allocator "
                 f"{'asks for transparent huge pages for large tensors' if thp else 'uses 4 KiB pages'} "
                 "(one setting for every column of this run)\n")
    text += (f"- block_size {bs}; dequant_reduce sums W = {args.world} ranks of numel / W elements; "
             "quantize_ef uses a float32 residual\n"
             f"- times: median over {args.rounds} alternating rounds (clone, copy_, eager, ours) of "
             "torch.utils.benchmark medians; GB/s = bytes the op must move / time\n"
             "- eager = the same computation in torch ops (benchmarks/bench_quant.py: eager_*); "
             "its stochastic variant uses torch.rand_like\n")
    if bnb_note:
        text += f"- {bnb_note}\n"
    else:
        text += (f"- x bnb: bitsandbytes {bnb_version} quantize_blockwise time / ours, same input and block "
                 "size (its dynamic 8-bit map; the same bytes moved)\n")
    text += "\n" + markdown_table(cols, rows)
    print(text)
    path = write_results("quant", dev, text, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
