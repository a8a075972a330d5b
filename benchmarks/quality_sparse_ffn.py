"""Quality of the gated sparse FFN by block count: a small byte-level language
model on the demo's corpus, trained on the same tokens in the same order with
a dense FFN and with GatedSparseFFN at 30% density for each block count in
``--n-blocks``, then evaluated on the demo's held-out files.

The text is the demo's corpus (``deepseek_ext.demo``'s ``demo_corpus``: the
Python standard library's sources, every 20th file held out). The model: byte
embedding + learned positions, ``--layers`` pre-norm transformer blocks
(ATen's scaled_dot_product_attention, causal), FFN d_ff = 4 * d_model (dense:
nn.Linear + GELU + nn.Linear; sparse: GatedSparseFFN with ``n_blocks``
blocks of d_ff / n_blocks units, balancing bias on, no auxiliary loss), AdamW,
cosine schedule. This ablation decides GatedSparseFFN's default ``n_blocks``.

    python benchmarks/quality_sparse_ffn.py [--steps 300] [--density 0.3] [--n-blocks 8,16,32,128] [--out PATH]
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402,F401
from benchmarks.common import header, markdown_table, write_results  # noqa: E402
from deepseek_ext.nn import GatedSparseFFN, ffn_flops  # noqa: E402


def load_corpus(train_bytes: float, eval_bytes: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tensors of the demo's corpus."""
    from deepseek_ext.demo._config import demo_corpus

    train_files, eval_files = demo_corpus(train_bytes, eval_bytes=eval_bytes)

    def read(files):
        data = b"".join(Path(f).read_bytes() for f in files)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    return read(train_files)[: int(train_bytes)], read(eval_files)


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
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--n-blocks", default="8,16,32,128", help="comma-separated block counts to compare")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--eval-windows", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/sparse_ffn_quality_cpu.md)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    train, held = load_corpus(args.corpus_mb * 1e6, eval_bytes=max(256e3, args.eval_windows * args.seq * 1.1))
    stride = max(1, (held.numel() - args.seq - 1) // args.eval_windows)
    evals = [(held[s: s + args.seq], held[s + 1: s + args.seq + 1])
             for s in range(0, held.numel() - args.seq - 1, stride)][: args.eval_windows]
    d, dff = args.d_model, 4 * args.d_model

    dense_loss, dense_s, dense_params = train_eval(
        "dense", lambda: nn.Sequential(nn.Linear(d, dff), nn.GELU(), nn.Linear(dff, d)), train, evals, args)
    rows = [["dense FFN", "-", "-", "-", "1.000", f"{dense_loss:.4f}", "-", f"{dense_s:.0f}", dense_params]]
    for nb in (int(n) for n in args.n_blocks.split(",")):
        fl = ffn_flops(d, dff, n_blocks=nb, density=args.density)
        loss, secs, params = train_eval(
            f"sparse n_blocks={nb}", lambda: GatedSparseFFN(d, dff, n_blocks=nb, density=args.density),
            train, evals, args)
        rows.append([f"GatedSparseFFN", nb, fl["block_size"], f"{fl['k']}/{nb}", f"{fl['ratio']:.3f}",
                     f"{loss:.4f}", f"{100 * (loss - dense_loss) / dense_loss:+.2f}%", f"{secs:.0f}", params])
    text = header("Gated sparse FFN quality by block count: byte-level LM on the demo corpus", "cpu")
    text += (f"- data: the demo's corpus (stdlib *.py), {train.numel() / 1e6:.1f} MB for training, "
             f"{len(evals)} windows of {args.seq} bytes from its held-out files\n"
             f"- model: {args.layers} layers, d_model {d}, d_ff {dff}, {args.heads} heads; {args.steps} AdamW "
             f"steps of {args.batch} x {args.seq} bytes, the same batches for every FFN; density "
             f"{args.density:g}; torch threads {args.threads}\n\n")
    text += markdown_table(["FFN", "n_blocks", "block width", "blocks/token", "FFN FLOPs ratio",
                            "eval loss (nats/byte)", "vs dense", "train s", "params"], rows)
    print(text)
    path = write_results("sparse_ffn_quality", "cpu", text, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
