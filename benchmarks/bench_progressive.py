"""Progressive training vs plain training of a small language model: steps and
wall time to reach a target eval loss, plus the monitor's overhead.

Corpus: Python standard-library sources (a fixed random subset of
``sysconfig.get_paths()["stdlib"]`` .py files), byte-level tokens, 90/10
train/eval split by token range. Model: a pre-LN causal transformer
(``TinyLM`` below) with ``--layers`` blocks.

- baseline: the full-depth model trained for ``--steps`` steps on all the data;
- progressive: ``ProgressiveSchedule(steps)``: phase 1 (first 30%) trains a
  model of ``--layers // 2`` blocks on a fixed random 10% of the data, then it
  is deepened to ``--layers`` by duplicating blocks (interleave; the copies'
  output projections start at zero, so the function is unchanged at the
  growth step) while the data fraction ramps to 100% over phase 2; phase 3
  (last 20%) trains only the top ``--layers // 2`` blocks and the output head.

Both use the same optimizer (AdamW, constant lr after a short warm-up), batch,
seed, eval set and eval points, and they run in lockstep in one process (one
step of each, alternating which goes first) so that the load of a shared
machine falls on both alike. Time-to-target counts training time only (eval
passes are excluded for both). The target is ``--target`` or, by default, the
mean of the baseline's last three eval losses (where the baseline ends, less
noisy than one eval): the question is when each run first reaches it. Both runs
log through a ``Monitor``; its own cost (time inside ``log`` plus its
background thread's CPU time) is reported as a fraction of the training time.

    python benchmarks/bench_progressive.py [--steps 600] [--device cpu|cuda] [--out PATH] [--plots DIR]
"""

import argparse
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402,F401
from benchmarks.common import header, markdown_table, write_results  # noqa: E402
from deepseek_ext.data import MemmapTokenDataset, build_token_dataset  # noqa: E402
from deepseek_ext.train import FractionSampler, Monitor, ProgressiveSchedule  # noqa: E402


def stdlib_files(max_mb: float, seed: int = 0):
    """A fixed random subset of the standard library's .py files, about max_mb in size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    random.Random(seed).shuffle(files)
    out, total = [], 0
    for f in files:
        size = f.stat().st_size
        if size == 0:
            continue
        out.append(f)
        total += size
        if total >= max_mb * 1e6:
            break
    return out


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def zero_residual_outputs(block: Block):
    """Makes a block the identity: both residual branches output zero."""
    for lin in (block.proj, block.out):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


class TinyLM(nn.Module):
    def __init__(self, vocab, d=128, n_layers=4, heads=4, max_len=256):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(n_layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.layers:
            x = blk(x)
        return self.head(self.ln_f(x))


def lm_loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model, eval_batches):
    model.eval()
    tot = sum(lm_loss(model, x, y) for x, y in eval_batches) / len(eval_batches)
    model.train()
    return float(tot)


class Run:
    """One training run (baseline or progressive) that advances one step at a time,
    so that the two runs can alternate steps on a shared machine."""

    def __init__(self, kind, args, train_ds, vocab, mon_dir):
        torch.manual_seed(args.seed)
        self.kind, self.args, self.dev = kind, args, args.device
        half = max(1, args.layers // 2)
        self.model = TinyLM(vocab, args.d_model, half if kind == "progressive" else args.layers,
                            max_len=args.seq_len).to(self.dev)
        self.sched = None
        if kind == "progressive":
            self.sched = ProgressiveSchedule(args.steps, phase1_frac=0.3, phase3_frac=0.2, data_fraction_start=0.1,
                                             grow_to_layers=args.layers, freeze_top_n=half,
                                             keep_trainable=("ln_f", "head"), init_new_block=zero_residual_outputs)
            sampler = FractionSampler(len(train_ds), self.sched, seed=args.seed)
        else:
            sampler = torch.utils.data.RandomSampler(train_ds, replacement=True, num_samples=10**9,
                                                     generator=torch.Generator().manual_seed(args.seed))
        self.loader = iter(DataLoader(train_ds, batch_size=args.batch, sampler=sampler, num_workers=0))
        params = self.sched.trainable_parameters(self.model) if self.sched else self.model.parameters()
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        self.warm = max(1, args.steps // 20)
        self.curve, self.train_s = [], 0.0
        self.mon = Monitor(mon_dir, device=self.dev, sample_interval_s=1.0, price_per_device_hour=args.price).start()

    def step(self, step):
        model, opt, sched, mon, args = self.model, self.opt, self.sched, self.mon, self.args
        t0 = time.perf_counter()
        if sched:
            sched.on_step(step)
            sched.maybe_grow(model, opt)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / self.warm)
        with mon.data_wait():
            x, y = next(self.loader)
        x, y = x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.log(step, loss=loss.detach(), tokens=x.numel(), layers=len(model.layers),
                phase=sched.phase if sched else 0)
        if self.dev == "cuda":
            torch.cuda.synchronize()
        self.train_s += time.perf_counter() - t0

    def evaluate(self, step, eval_batches):
        ev = evaluate(self.model, eval_batches)
        self.curve.append((step, self.train_s, ev))
        self.mon.log(max(0, step - 1), eval_loss=ev)
        print(f"{self.kind:12s} step {step:5d}  train {self.train_s:7.1f} s  eval loss {ev:.4f}  "
              f"layers {len(self.model.layers)}", flush=True)

    def finish(self):
        summary = self.mon.close()
        self.mon.plot()
        return {"curve": self.curve, "train_s": self.train_s, "final_eval": self.curve[-1][2], "monitor": summary,
                "params": sum(p.numel() for p in self.model.parameters()),
                "history": self.sched.history if self.sched else []}


def run_both(args, train_ds, eval_batches, vocab, work):
    """Both runs in lockstep: each step, one step of each, the order alternating,
    so that a slow spell of the shared machine hits both alike."""
    runs = [Run(k, args, train_ds, vocab, work / k) for k in ("baseline", "progressive")]
    for r in runs:
        r.evaluate(0, eval_batches)
    for step in range(args.steps):
        for r in (runs if step % 2 == 0 else runs[::-1]):
            r.step(step)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            for r in runs:
                r.evaluate(step + 1, eval_batches)
    return {r.kind: r.finish() for r in runs}


def first_reach(curve, target):
    for step, t, ev in curve:
        if ev <= target:
            return step, t
    return None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=12)
    p.add_argument("--corpus-mb", type=float, default=8.0)
    p.add_argument("--target", type=float, default=None,
                   help="target eval loss (default: mean of the baseline's last 3 eval losses)")
    p.add_argument("--price", type=float, default=2.0, help="price per device-hour for the monitor's cost column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/progressive_<device class>.md)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="also copy each run's Monitor loss plot into DIR (progressive_<run>_loss.png)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench_progressive_"))
    try:
        files = stdlib_files(args.corpus_mb)
        info = build_token_dataset(files, work / "corpus.bin")
        train_ds = MemmapTokenDataset(info.path, args.seq_len, split=(0.0, 0.9))
        eval_ds = MemmapTokenDataset(info.path, args.seq_len, split=(0.9, 1.0))
        g = torch.Generator().manual_seed(1234)
        pick = torch.randperm(len(eval_ds), generator=g)[:args.eval_batches * args.batch].tolist()
        eval_batches = [tuple(torch.stack(t).to(args.device) for t in zip(*[eval_ds[i] for i in pick[k:k + args.batch]]))
                        for k in range(0, len(pick), args.batch)]
        print(f"corpus: {len(files)} files, {info.num_tokens / 1e6:.1f}M byte tokens; "
              f"{len(train_ds)} train windows", flush=True)
        results = run_both(args, train_ds, eval_batches, info.vocab_size, work)
        if args.plots:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
            for k in results:
                shutil.copy(work / k / "loss.png", Path(args.plots) / f"progressive_{k}_loss.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base, prog = results["baseline"], results["progressive"]
    last3 = [ev for _, _, ev in base["curve"][-3:]]
    target = args.target if args.target is not None else sum(last3) / len(last3)
    rows = []
    reach = {}
    for k, r in results.items():
        step, t = first_reach(r["curve"], target)
        reach[k] = (step, t)
        m = r["monitor"]
        overhead = (m["monitor_log_s"] + m["monitor_thread_cpu_s"]) / r["train_s"]
        rows.append([k, f"{r['params'] / 1e6:.2f}M", f"{r['final_eval']:.4f}", f"{r['train_s']:.1f}",
                     f"{1e3 * r['train_s'] / args.steps:.1f}", step if step else "not reached",
                     f"{t:.1f}" if t else "-", f"{100 * m['monitor_log_s'] / r['train_s']:.3f}%",
                     f"{100 * overhead:.3f}%"])
    text = header("Progressive training vs plain training: time to a target eval loss", args.device)
    text += (f"- model: TinyLM d={args.d_model}, {args.layers} layers (progressive: {max(1, args.layers // 2)} "
             f"-> {args.layers} at step {round(0.3 * args.steps)}, top {max(1, args.layers // 2)} + head "
             f"trained from step {args.steps - round(0.2 * args.steps)})\n"
             f"- data: {len(files)} stdlib .py files, {info.num_tokens / 1e6:.1f}M byte tokens, "
             f"seq {args.seq_len}, batch {args.batch}, {args.steps} steps, AdamW lr {args.lr}, seed {args.seed}, "
             f"torch threads {torch.get_num_threads()}\n"
             f"- target eval loss: {target:.4f} nats/byte "
             f"({'given' if args.target is not None else 'the mean of the baseline last 3 eval losses'}); "
             f"eval every {args.eval_every} steps on {args.eval_batches} held-out batches\n"
             "- time = training time (eval passes excluded); monitor = time inside Monitor.log / train time, "
             "and + its background thread CPU time\n\n")
    cols = ["run", "params", "final eval loss", "train s", "ms/step", "steps to target", "s to target",
            "monitor log", "monitor total"]
    text += markdown_table(cols, rows)
    (bs, bt), (ps, pt) = reach["baseline"], reach["progressive"]
    if ps is not None and bt:
        ratio = pt / bt
        text += (f"\nProgressive reached the target in {pt:.1f} s vs {bt:.1f} s: time ratio {ratio:.2f} "
                 f"({100 * abs(1 - ratio):.0f}% {'shorter' if ratio < 1 else 'longer'}), "
                 f"steps {ps} vs {bs}.\n")
    else:
        text += (f"\nProgressive did not reach the target {target:.4f} within {args.steps} steps "
                 f"(final {prog['final_eval']:.4f}).\n")
    print(text)
    path = write_results("progressive", args.device, text, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
