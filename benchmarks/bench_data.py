"""Data pipeline vs a naive text dataset: loading throughput, data wait in a
training loop, and the padding saved by token-budget batching.

Corpus: a fixed random subset of the Python standard library's .py files
(``--corpus-mb``), tokenised two ways: bytes (257 ids) and a byte-level BPE
with ``--vocab`` ids trained here, offline, with Hugging Face ``tokenizers``.

1. Loading: samples/s and tokens/s through ``DataLoader(batch_size, shuffle=True,
   num_workers=W)`` with the same W for every pipeline:
   - ours: ``MemmapTokenDataset`` (windows from the memory-mapped token file);
   - naive: ``NaiveTextDataset`` (per item: open the file, read and decode it,
     tokenise it, slice the window -- a pipeline without a preprocessing step);
   - RAM tensor: the whole token array already in a torch tensor, windows by
     slicing (a reference ceiling: no file at all, the data must fit in memory).
   Timed after the first batch (worker start-up excluded), in alternating rounds;
   the median round is reported. Build time of the token file (ours) and the
   naive dataset's construction are reported beside.
2. Training loop: a small causal LM (bench_progressive.TinyLM) trained for
   ``--train-steps`` steps with each pipeline (BPE tokens); data wait = time the
   loop is blocked waiting for the next batch, measured by ``Monitor.timed``,
   as a fraction of the loop's wall time. Ours adds ``Prefetcher``.
3. Batching: padding of whole documents (cut at ``--max-len``) batched by a fixed
   batch size vs ``TokenBudgetBatcher`` at the same mean tokens per batch.

    python benchmarks/bench_data.py [--workers 2] [--device cpu|cuda] [--out PATH]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the naive workers are forked

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepseek_ext  # noqa: E402,F401
from benchmarks.bench_progressive import TinyLM, lm_loss, stdlib_files  # noqa: E402
from benchmarks.common import header, markdown_table, write_results  # noqa: E402
from deepseek_ext.data import (MemmapDocumentDataset, MemmapTokenDataset, NaiveTextDataset,  # noqa: E402
                               Prefetcher, TokenBudgetBatcher, build_token_dataset)
from deepseek_ext.train import Monitor  # noqa: E402


class RamTokenDataset(Dataset):
    """Reference ceiling: all tokens in one int64 tensor in RAM."""

    def __init__(self, path, dtype, seq_len):
        self.tokens = torch.from_numpy(np.fromfile(path, dtype=dtype).astype(np.int64))
        self.seq_len = seq_len

    def __len__(self):
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i):
        w = self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1]
        return w[:-1], w[1:]


def loader_rate(ds, args, workers, seconds):
    """samples/s of one timed pass (after the first batch; epochs restart as needed)."""
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += x.shape[0]
    dt = time.perf_counter() - t0
    del it, loader
    return n / dt


def train_loop(ds, args, prefetch, mon_dir):
    torch.manual_seed(0)
    model = TinyLM(ds.vocab_size, args.d_model, 4, max_len=args.train_seq_len).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(ds, batch_size=args.train_batch, shuffle=True, num_workers=args.train_workers,
                        pin_memory=args.device == "cuda", generator=torch.Generator().manual_seed(0))
    source = Prefetcher(loader, args.device, depth=2) if prefetch else loader
    mon = Monitor(mon_dir, device=args.device, sample_interval_s=0.5, tensorboard=False).start()
    it = mon.timed(source)
    x, y = next(it)  # worker start-up is not part of the measurement
    wait0 = mon.data_wait_s
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mon.log(step, loss=loss.detach(), tokens=x.numel())
        if step + 1 < args.train_steps:
            x, y = next(it)
    if args.device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    s = mon.close()
    wait = s["data_wait_s"] - wait0
    return {"wall_s": wall, "step_ms": 1e3 * wall / args.train_steps, "data_wait_s": wait,
            "data_wait_fraction": wait / wall, "monitor_log_s": s["monitor_log_s"],
            "monitor_thread_cpu_s": s["monitor_thread_cpu_s"], "final_loss": s["last"]["loss"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts for the loading table")
    p.add_argument("--train-workers", type=int, default=2, help="DataLoader workers in the training loop")
    p.add_argument("--corpus-mb", type=float, default=8.0)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=2.0, help="per timed pass")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training process (0: torch's choice)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--out", default=None, help="results file or folder for an ad-hoc run "
                   "(default benchmarks/results/data_<device class>.md)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    kb_per_item = 0.0
    try:
        files = stdlib_files(args.corpus_mb)
        mb = sum(f.stat().st_size for f in files) / 1e6
        # The naive pipeline reads and tokenises a window's whole file, and big
        # files hold more windows: the mean file size per item is size-biased.
        sizes = np.array([f.stat().st_size for f in files], dtype=np.float64)
        wins = np.maximum(0, (sizes - 1) // args.seq_len)
        kb_per_item = float((wins * sizes).sum() / wins.sum() / 1e3)
        print(f"corpus: {len(files)} files, {mb:.1f} MB", flush=True)
        infos, build_s = {}, {}
        for tok in ("byte", "bpe"):
            t0 = time.perf_counter()
            infos[tok] = build_token_dataset(files, work / f"{tok}.bin", tok,
                                             vocab_size=args.vocab if tok == "bpe" else None)
            build_s[tok] = time.perf_counter() - t0
            print(f"built {tok}: {infos[tok].num_tokens / 1e6:.2f}M tokens in {build_s[tok]:.1f} s", flush=True)

        # ---- 1. loading throughput
        rows = []
        for tok, info in infos.items():
            t0 = time.perf_counter()
            naive = NaiveTextDataset(files, args.seq_len, "byte" if tok == "byte" else info)
            naive_init = time.perf_counter() - t0
            pipes = {"ours (memmap)": MemmapTokenDataset(info.path, args.seq_len),
                     "naive (text per item)": naive,
                     "RAM tensor (ceiling)": RamTokenDataset(info.path, np.uint16, args.seq_len)}
            for w in workers:
                rates = {k: [] for k in pipes}
                for r in range(args.rounds):
                    for k, ds in pipes.items():
                        rates[k].append(loader_rate(ds, args, w, args.seconds))
                        print(f"{tok} {w} workers round {r}: {k}: {rates[k][-1]:.0f} samples/s", flush=True)
                med = {k: statistics.median(v) for k, v in rates.items()}
                for k in pipes:
                    setup = build_s[tok] if k.startswith("ours") else (naive_init if k.startswith("naive") else None)
                    rows.append([tok, w, k, len(pipes[k]), f"{med[k]:.0f}", f"{med[k] * args.seq_len / 1e6:.2f}",
                                 f"{med[k] / med['naive (text per item)']:.1f}x",
                                 f"{setup:.1f}" if setup is not None else "-"])
        load_table = markdown_table(["tokens", "workers", "pipeline", "windows", "samples/s", "Mtokens/s",
                                     "x naive", "setup s"], rows)
        print(load_table, flush=True)

        # ---- 2. data wait in a training loop (BPE tokens)
        info = infos["bpe"]
        loops = {"ours + Prefetcher": (MemmapTokenDataset(info.path, args.train_seq_len), True),
                 "naive": (NaiveTextDataset(files, args.train_seq_len, info), False)}
        rows = []
        for k, (ds, pf) in loops.items():
            r = train_loop(ds, args, pf, work / k.replace(" ", "_"))
            rows.append([k, f"{r['step_ms']:.1f}", f"{r['data_wait_s']:.2f}", f"{100 * r['data_wait_fraction']:.1f}%",
                         f"{100 * r['monitor_log_s'] / r['wall_s']:.3f}%",
                         f"{100 * (r['monitor_log_s'] + r['monitor_thread_cpu_s']) / r['wall_s']:.3f}%"])
            print(rows[-1], flush=True)
        train_table = markdown_table(["pipeline", "ms/step", "data wait s", "data wait % of loop",
                                      "monitor log %", "monitor total %"], rows)

        # ---- 3. padding: fixed batch size vs token budget
        docs = MemmapDocumentDataset(info.path, args.max_len)
        lengths = docs.lengths
        bb = TokenBudgetBatcher(lengths, args.max_tokens, seed=0)
        st = bb.stats()
        fixed_bs = max(1, round(len(lengths) / st["batches"]))
        perm = np.random.default_rng(0).permutation(len(lengths))
        fixed = [perm[i:i + fixed_bs] for i in range(0, len(perm), fixed_bs)]
        slots = sum(len(b) * lengths[b].max() for b in fixed)
        fixed_pad = 1 - lengths.sum() / slots
        fixed_max = max(len(b) * int(lengths[b].max()) for b in fixed)
        rows = [[f"fixed batch size {fixed_bs}", len(fixed), f"{100 * fixed_pad:.1f}%", fixed_max],
                [f"TokenBudgetBatcher({args.max_tokens})", st["batches"], f"{100 * st['padding_fraction']:.1f}%",
                 st["max_batch_tokens"]]]
        batch_table = markdown_table(["batching", "batches", "padding (of padded tokens)", "largest batch (tokens)"], rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = header("Data pipeline vs naive text loading", args.device)
    text += (f"- corpus: {len(files)} stdlib .py files, {mb:.1f} MB; byte tokens and a {args.vocab}-id BPE "
             f"(tokenizers, trained here)\n"
             f"- loading: DataLoader(batch {args.batch}, seq {args.seq_len}, shuffle, W workers) with the same W "
             f"for every pipeline; median of {args.rounds} alternating {args.seconds:.0f} s passes; "
             "setup = token-file build (ours) / dataset construction (naive)\n"
             f"- naive: per item it reads and tokenises the window's whole file, {kb_per_item:.0f} KB on average "
             f"(files average {sizes.mean() / 1e3:.0f} KB, but big files hold more windows)\n"
             f"- training loop: TinyLM d={args.d_model} x 4 layers, batch {args.train_batch} x seq "
             f"{args.train_seq_len}, BPE tokens, {args.train_steps} steps, {args.train_workers} workers, "
             f"torch threads {torch.get_num_threads()}\n\n"
             "Loading throughput:\n\n" + load_table +
             "\nData wait in the training loop (fraction of the loop's wall time spent blocked on the next batch):\n\n"
             + train_table +
             f"\nPadding of {len(lengths)} document pieces (max {args.max_len} tokens) at the same number of batches:\n\n"
             + batch_table)
    print(text)
    path = write_results("data", args.device, text, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
