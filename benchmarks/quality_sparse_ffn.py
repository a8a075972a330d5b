"""Quality of the gated sparse FFN: a small byte-level language model on real
text, trained twice on the same tokens in the same order -- once with a dense
FFN, once with GatedSparseFFN at 30% density -- and evaluated on held-out text.

The text is the Python standard library's source (``sysconfig`` stdlib path,
``*.py`` files in sorted order; the last 10% of the bytes are held out). The
model: byte embedding + learned positions, ``--layers`` pre-norm transformer
blocks (ATen's scaled_dot_product_attention, causal), FFN d_ff = 4 * d_model
(dense: nn.Linear + GELU + nn.Linear; sparse: GatedSparseFFN, block_size 32,
balancing bias on, no auxiliary loss), AdamW, cosine schedule.

    python benchmarks/quality_sparse_ffn.py [--steps 1500] [--density 0.3] [--out PATH]
"""

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402,F401
from benchmarks.common import header, markdown_table, write_results  # noqa: E402
from deepseek_ext.nn import GatedSparseFFN, ffn_flops  # noqa: E402


def load_corpus(max_bytes: int) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for f in sorted(root.glob("*.py")):
        b = f.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = ffn

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.ffn(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, d, heads, layers, seq, make_ffn):
        super().__init__()
        self.emb, self.pos = nn.Embedding(256, d), nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, make_ffn()) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def train_eval(name, make_ffn, train, evals, args):
    torch.manual_seed(args.seed)
    model = ByteLM(args.d_model, args.heads, args.layers, args.seq, make_ffn)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)  # same batches for both models
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train.numel() - args.seq - 1, (args.batch,), generator=gen)
        xb = torch.stack([train[s: s + args.seq] for s in starts])
        yb = torch.stack([train[s + 1: s + args.seq + 1] for s in starts])
        loss = F.cross_entropy(model(xb).view(-1, 256), yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"{name} step {step} loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(xb.unsqueeze(0))[0], yb) for xb, yb in evals]
    return torch.stack(losses).mean().item(), train_s, sum(p.numel() for p in model.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--eval-windows", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/sparse_ffn_quality_cpu.md)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    data = load_corpus(args.corpus_bytes)
    split = int(0.9 * data.numel())
    train, held = data[:split], data[split:]
    stride = max(1, (held.numel() - args.seq - 1) // args.eval_windows)
    evals = [(held[s: s + args.seq], held[s + 1: s + args.seq + 1])
             for s in range(0, held.numel() - args.seq - 1, stride)][: args.eval_windows]
    d, dff = args.d_model, 4 * args.d_model

    results = {}
    results["dense"] = train_eval("dense", lambda: nn.Sequential(nn.Linear(d, dff), nn.GELU(), nn.Linear(dff, d)),
                                  train, evals, args)
    results["sparse"] = train_eval(
        "sparse", lambda: GatedSparseFFN(d, dff, block_size=args.block_size, density=args.density),
        train, evals, args)
    fl = ffn_flops(d, dff, block_size=args.block_size, density=args.density)
    dense_loss, sparse_loss = results["dense"][0], results["sparse"][0]
    rel = (sparse_loss - dense_loss) / dense_loss
    rows = [["dense FFN", "1.000", f"{dense_loss:.4f}", "-", f"{results['dense'][1]:.0f}", results["dense"][2]],
            [f"GatedSparseFFN {fl['k']}/{fl['n_blocks']} blocks", f"{fl['ratio']:.3f}", f"{sparse_loss:.4f}",
             f"{100 * rel:+.2f}%", f"{results['sparse'][1]:.0f}", results["sparse"][2]]]
    text = header("Gated sparse FFN quality: byte-level LM on Python stdlib source", "cpu")
    text += (f"- data: {data.numel() / 1e6:.1f} MB of stdlib *.py, 90/10 split, {len(evals)} held-out windows of "
             f"{args.seq} bytes\n- model: {args.layers} layers, d_model {d}, d_ff {dff}, {args.heads} heads; "
             f"{args.steps} AdamW steps of {args.batch} x {args.seq} bytes, same batches for both\n\n")
    text += markdown_table(["FFN", "FFN FLOPs ratio", "eval loss (nats/byte)", "vs dense", "train s", "params"], rows)
    print(text)
    path = write_results("sparse_ffn_quality", "cpu", text, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
