"""One training step of a small GPT: DynamicLossScaler + deepseek_ext.nn.Linear
vs torch.amp.GradScaler + torch.nn.Linear, in one run.

Reports the median step time and the host syncs per step. Syncs are counted
by intercepting every call that reads a tensor on the host (item, tolist,
__bool__, __float__, __int__, cpu, numpy) with a TorchFunctionMode, and on
CUDA also with torch.cuda.set_sync_debug_mode("warn").

    python benchmarks/bench_scaler.py [--device cpu|cuda] [--out PATH]
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402
from benchmarks.common import (compare_seconds, cpu_matmul_seconds, header, markdown_table,  # noqa: E402
                               write_results)

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy}


class CountHostReads(TorchFunctionMode):
    def __init__(self, device):
        super().__init__()
        self.device, self.count = device, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and args and isinstance(args[0], torch.Tensor) and args[0].device.type == self.device:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Block(torch.nn.Module):
    def __init__(self, d, heads, linear):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = linear(d, 3 * d), linear(d, d)
        self.fc1, self.fc2 = linear(d, 4 * d), linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(torch.nn.Module):
    def __init__(self, vocab, d, layers, heads, ctx, linear):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads, linear) for _ in range(layers))
        self.ln, self.head = torch.nn.LayerNorm(d), linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def make_step(dev, ours, fused, cfg, data):
    torch.manual_seed(0)
    linear = deepseek_ext.nn.Linear if ours else torch.nn.Linear
    model = GPT(linear=linear, **cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    scaler = deepseek_ext.amp.DynamicLossScaler(dev) if ours else torch.amp.GradScaler(dev)
    idx, tgt = data

    def step():
        with torch.autocast(dev, dtype=torch.float16):
            logits = model(idx)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.view(-1))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def count_syncs(step, dev):
    step()
    mode = CountHostReads(dev)
    cuda_warnings = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with mode:
                for _ in range(3):
                    step()
        finally:
            if dev == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        cuda_warnings = sum("synchroniz" in str(w.message) for w in caught)
    return mode.count / 3, (cuda_warnings / 3 if dev == "cuda" else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/scaler_<device class>.md)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda":
        cfg, batch = dict(vocab=32000, d=768, layers=12, heads=12, ctx=1024), (8, 1024)
    else:
        cfg, batch = dict(vocab=2048, d=128, layers=2, heads=4, ctx=64), (8, 64)
    gen = torch.Generator().manual_seed(0)
    data = (torch.randint(0, cfg["vocab"], batch, generator=gen).to(dev),
            torch.randint(0, cfg["vocab"], batch, generator=gen).to(dev))

    rows = []
    for fused in (False, True):
        steps = {name: make_step(dev, name == "ours", fused, cfg, data) for name in ("GradScaler", "ours")}
        t_theirs, t_ours = compare_seconds([steps["GradScaler"], steps["ours"]], dev, args.rounds, 0.5)
        for name, t in (("GradScaler + torch.nn.Linear", t_theirs),
                        ("DynamicLossScaler + deepseek_ext.nn.Linear (ours)", t_ours)):
            reads, cuda_syncs = count_syncs(steps["ours" if "ours" in name else "GradScaler"], dev)
            rows.append([f"AdamW(fused={fused})", name, f"{t * 1e3:.2f}", f"{reads:.0f}",
                         "-" if cuda_syncs is None else f"{cuda_syncs:.0f}", f"{t_theirs / t:.3f}"])
    cols = ["optimizer", "scaler", "step ms", "host reads / step", "CUDA syncs / step", "speedup vs GradScaler"]
    text = header("One fp16 training step: DynamicLossScaler vs torch.amp.GradScaler", dev)
    text += f"- model: GPT {cfg}, batch {batch}, autocast float16\n"
    text += ("- host reads: calls that read a device tensor on the host (item, tolist, bool, ...), counted by a "
             "TorchFunctionMode (they include the optimizer's own reads; on a CPU a read is not a device sync); "
             "CUDA syncs: torch.cuda.set_sync_debug_mode warnings\n")
    if dev == "cpu":
        t_half = cpu_matmul_seconds()
        how = ("oneDNN's, as on CPUs with AVX512-FP16 or AMX-FP16" if t_half < 0.1 else
               "ATen's scalar fallback: this CPU has neither AVX512-FP16 nor AMX-FP16")
        text += ("- on the CPU deepseek_ext.nn.Linear computes its float16 weight and bias gradients through "
                 "float32 BLAS on float32 copies of its operands; torch.nn.Linear's backward, and every other "
                 f"float16 GEMM of the step, runs torch's float16 GEMM, which took {t_half:.3f} s at 1024^3 "
                 f"here ({how})\n")
    text += "\n"
    text += markdown_table(cols, rows)
    print(text)
    print(f"written to {write_results('scaler', dev, text, args.out)}")


if __name__ == "__main__":
    main()
