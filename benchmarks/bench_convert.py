"""The converters on a model nobody here wrote: a tiny random Hugging Face Llama
trained on the demo corpus, dense vs each converter vs all of them, at equal tokens.

Runs (each from the same initial weights, same batches, same optimizer):

- dense: ``LlamaForCausalLM`` as ``transformers`` builds it;
- sparsify_ffn_: its SwiGLU MLPs -> ``GatedSparseFFN`` (``--density``, ``--n-blocks``);
- share_attention_: attention weights shared by every layer (plan ``all``);
- use_fused_linear_: ``nn.Linear`` -> ``deepseek_ext.nn.Linear`` (its gain is the
  unscale-and-check fused into the weight-gradient GEMM under a loss scale on a
  GPU; in an fp32 CPU run it only shows its cost);
- all: ``Recipe.low_cost().apply(model)`` (the three together).

The runs advance in lockstep, one step of each in a rotating order, so the load
of a shared machine falls on all alike; tokens/s counts training steps only.
Eval loss: mean next-byte cross-entropy (nats) on held-out windows of the
demo's held-out files.

    python benchmarks/bench_convert.py [--steps 240] [--device cpu|cuda] [--out PATH]
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import header, markdown_table, write_results  # noqa: E402
from deepseek_ext import convert  # noqa: E402
from deepseek_ext.demo._config import demo_corpus  # noqa: E402
from deepseek_ext.nn import GatedSparseFFN  # noqa: E402
from deepseek_ext.recipe import Recipe  # noqa: E402


def byte_tokens(files, limit: int) -> torch.Tensor:
    data = bytearray()
    for f in files:
        data += Path(f).read_bytes()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def ffn_flops(model, d_model: int, d_ff: int) -> int:
    """Forward FLOPs per token of every FFN (gate GEMMs included)."""
    sparse = [m for m in model.modules() if isinstance(m, GatedSparseFFN)]
    if not sparse:
        return 2 * d_model * d_ff * 3 * model.config.num_hidden_layers
    from deepseek_ext.nn import ffn_flops as formula

    return sum(int(formula(m.d_model, m.d_ff, n_blocks=m.n_blocks, density=m.density, activation=m.activation,
                           shared_blocks=m.shared_blocks)["sparse"]) for m in sparse)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--n-blocks", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/convert_<device class>.md)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    train_files, eval_files = demo_corpus(train_bytes=4e6)
    train = byte_tokens(train_files, 4_000_000)
    held = byte_tokens(eval_files, 256_000)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.d_model, intermediate_size=args.d_ff,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    dense = LlamaForCausalLM(cfg)
    runs = {}
    for name in ("dense", "sparsify_ffn_", "share_attention_", "use_fused_linear_", "all"):
        model = copy.deepcopy(dense)
        if name == "sparsify_ffn_":
            convert.sparsify_ffn_(model, density=args.density, n_blocks=args.n_blocks)
        elif name == "share_attention_":
            convert.share_attention_(model, "all")
        elif name == "use_fused_linear_":
            convert.use_fused_linear_(model)
        elif name == "all":
            Recipe.low_cost(ffn_density=args.density, ffn_n_blocks=args.n_blocks).apply(model)
        model.to(args.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        runs[name] = {"model": model, "opt": opt, "seconds": 0.0,
                      "params": sum(p.numel() for p in model.parameters()),
                      "ffn_flops": ffn_flops(model, args.d_model, args.d_ff)}
    gen = torch.Generator().manual_seed(args.seed + 1)
    names = list(runs)
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s:s + args.seq_len] for s in starts]).to(args.device)
        lr = args.lr * min(1.0, (step + 1) / 20)
        k = step % len(names)
        for name in names[k:] + names[:k]:
            r = runs[name]
            for g in r["opt"].param_groups:
                g["lr"] = lr
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r["model"](batch, labels=batch).loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            r["seconds"] += time.perf_counter() - t0
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps}", flush=True)
    starts = torch.linspace(0, len(held) - args.seq_len - 1, args.eval_windows).long()
    windows = torch.stack([held[s:s + args.seq_len] for s in starts]).to(args.device)
    tokens = args.steps * args.batch * args.seq_len
    rows = []
    base = None
    for name, r in runs.items():
        model = r["model"].eval()
        with torch.no_grad():
            loss = sum(model(w, labels=w).loss.item() for w in windows.split(16)) / len(windows.split(16))
        tps = tokens / r["seconds"]
        if base is None:
            base = (loss, tps, r["params"], r["ffn_flops"])
        rows.append([name, f"{loss:.4f}", f"{loss / base[0]:.3f}x", f"{tps:,.0f}", f"{tps / base[1]:.2f}x",
                     f"{r['params']:,}", f"{r['params'] / base[2]:.3f}x", f"{r['ffn_flops']:,}",
                     f"{r['ffn_flops'] / base[3]:.3f}x"])
    text = header("The converters on a Hugging Face Llama: dense vs each converter vs all, at equal tokens",
                  args.device)
    text += (f"- model: LlamaForCausalLM (transformers {__import__('transformers').__version__}), "
             f"hidden {args.d_model}, intermediate {args.d_ff} (SwiGLU), {args.layers} layers, 4 heads / 2 KV "
             f"heads, byte vocabulary 256, untied head, random init (seed {args.seed})\n"
             f"- data: the demo corpus (stdlib .py files; held-out files for eval), seq {args.seq_len}, "
             f"batch {args.batch}, {args.steps} steps = {tokens:,} tokens per run, AdamW lr {args.lr}, "
             f"torch threads {torch.get_num_threads()}\n"
             f"- sparse FFN: density {args.density}, {args.n_blocks} blocks; shared attention: plan all\n"
             f"- eval loss: mean cross-entropy (nats/byte) on {args.eval_windows} held-out windows; tokens/s: "
             "training steps only, the runs in lockstep\n\n")
    text += markdown_table(["run", "eval loss", "vs dense", "tokens/s", "vs dense", "parameters", "vs dense",
                            "FFN FLOPs/token", "vs dense"], rows)
    print(text)
    print(f"written to {write_results('convert', args.device, text, args.out)}")


if __name__ == "__main__":
    main()
