"""The main job: train a small GPT-style language model twice and compare the cost.

    python -m deepseek_ext.demo             # baseline vs low-cost recipe (about 10 min on 2 CPU cores)
    python -m deepseek_ext.demo --ablate    # ... and every technique alone against the baseline
    python -m deepseek_ext.demo --smoke     # a tiny configuration (well under a minute)
    python -m deepseek_ext.demo --device cuda
    python -m deepseek_ext.demo --model hf-llama  # a Hugging Face Llama, converted by Recipe.apply

Both runs train on the same real text (the Python standard library's source
files, byte-level tokens: nothing to download), with the same token budget, in
``--world-size`` processes joined by torch.distributed (Gloo on CPU, NCCL on
CUDA) and DDP. The baseline is fp32, dense FFN, unshared attention, DDP's plain
allreduce and a naive data loader that reads and tokenises text per sample; the
low-cost run turns on every technique of :class:`deepseek_ext.recipe.Recipe`.
The report (``report.json``), each run's monitor output (JSONL, TensorBoard
events, PNG plots) and a loss-curve comparison go to ``runs/demo-<timestamp>/``;
``--results-dir benchmarks/results`` also writes ``demo_<device class>.md``
(``make demo`` does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from deepseek_ext.demo._config import CUDA_DEFAULTS, PRESETS, SMOKE, DemoConfig, demo_corpus
from deepseek_ext.demo._report import (add_time_to_baseline_loss, comparison_table, machine_line, plot_losses,
                                       write_results)
from deepseek_ext.demo._models import MODELS
from deepseek_ext.demo._train import run_one
from deepseek_ext.recipe import TECHNIQUES, Recipe


def run_demo(cfg: DemoConfig, out: Path, ablate: bool = False, results_dir: Optional[Path] = None,
             command: str = "") -> dict:
    from deepseek_ext.data import build_token_dataset

    # glibc raises its mmap threshold as large blocks are freed, after which the
    # sparse FFN's per-step buffers of varying size fragment the heap: resident
    # memory creeps up by hundreds of MiB over a run (measured: 1.19 GB after 80
    # steps vs 0.73 GB with a fixed threshold). A fixed threshold, the same for
    # every run, keeps peak memory a measure of what the model needs.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))

    out.mkdir(parents=True, exist_ok=True)
    train_files, eval_files = demo_corpus(cfg.train_corpus_mb * 1e6,
                                          eval_bytes=max(256e3, cfg.eval_windows * cfg.seq_len * 1.1))
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    train_info = build_token_dataset(train_files, data_dir / "train.bin", tokenizer="byte", overwrite=True)
    eval_info = build_token_dataset(eval_files, data_dir / "eval.bin", tokenizer="byte", overwrite=True)
    data = dict(vocab_size=max(train_info.vocab_size, eval_info.vocab_size), train_files=train_files,
                eval_files=eval_files, train_bin=str(data_dir / "train.bin"), eval_bin=str(data_dir / "eval.bin"))
    print(f"corpus: {len(train_files)} stdlib files for training ({_tokens(train_info):,} byte tokens), "
          f"{len(eval_files)} held-out files for evaluation ({_tokens(eval_info):,} tokens)")
    print(f"budget: {cfg.steps} steps x {cfg.tokens_per_step:,} tokens = {cfg.steps * cfg.tokens_per_step:,} "
          f"tokens per run, {cfg.world_size} processes ({'NCCL' if cfg.device == 'cuda' else 'Gloo'})")

    techniques = TECHNIQUES
    if cfg.model != "gpt":
        # A Hugging Face model gets the recipe through Recipe.apply (the converters);
        # progressive growth copies blocks of our own model and is left out.
        techniques = tuple(t for t in TECHNIQUES if t != "progressive")
        print(f"model: {cfg.model} (Hugging Face, random init); the low-cost run converts it with "
              "Recipe.apply; progressive training is for --model gpt only")
    amp = dict(amp_dtype=cfg.amp_dtype)
    base = Recipe.baseline(mixed_precision=cfg.baseline_amp, **amp)
    low = Recipe(**{t: True for t in techniques}, **amp)
    runs = [("baseline", base), ("low-cost", low)]
    if cfg.baseline_amp and cfg.amp_dtype == "bfloat16":
        # The fp16 row: the same recipe with float16 autocast and our loss scaler.
        runs.append(("low-cost fp16", low.replace(amp_dtype="float16")))
    if ablate:
        for t in techniques:
            if t == "mixed_precision" and cfg.device != "cuda":
                print("ablate: mixed_precision skipped on CPU (fp32 either way; see Recipe)")
                continue
            if t == "mixed_precision" and cfg.baseline_amp:
                continue  # the baseline is already in mixed precision; the fp16 row is its variant
            runs.append((f"+{t}", base.replace(**{t: True})))
    results = []
    for name, recipe in runs:
        results.append(run_one(name.replace("+", "only-"), recipe, cfg, out, data))
        results[-1]["name"] = name
    n_main = 3 if len(runs) > 2 and runs[2][0] == "low-cost fp16" else 2
    if cfg.eval_every:
        add_time_to_baseline_loss(results)
    main_table = comparison_table(results[:n_main])
    report = dict(machine=machine_line(cfg), config=asdict(cfg), runs=results, table=main_table)
    print()
    print(f"machine: {report['machine']}")
    print(main_table)
    if ablate:
        report["ablate_table"] = comparison_table([results[0]] + results[n_main:])
        print("ablation (each technique alone vs the baseline):")
        print(report["ablate_table"])
    plot = plot_losses(results[:2], out / "loss_curves.png")
    if plot:
        report["comparison_plot"] = str(plot)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(f"machine: {report['machine']}\n\n{main_table}\n"
                                   + (f"\nablation:\n\n{report['ablate_table']}" if ablate else ""))
    print(f"report, plots and monitor logs: {out}/")
    if results_dir is not None:
        print(f"results table: {write_results(report, cfg, results_dir, plot, command)}")
    return report


def _tokens(info) -> int:
    for key in ("num_tokens", "n_tokens", "tokens"):
        if hasattr(info, key):
            return int(getattr(info, key))
    return -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepseek_ext.demo", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=MODELS, default="gpt",
                   help="gpt: the demo's own model; hf-gpt2 / hf-llama: a Hugging Face model of the same "
                   "size (random init, built in code), converted by Recipe.apply for the low-cost run")
    p.add_argument("--smoke", action="store_true", help="a tiny configuration for tests (well under a minute)")
    p.add_argument("--ablate", action="store_true", help="also run each technique alone against the baseline")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo-<timestamp>)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="gpt2-small: GPT-2 small's architecture on one GPU, bf16 baseline vs low-cost (bf16, and "
                   "an fp16 + loss scaler row), time to the baseline's loss, MFU; gpt2-small-tiny: the same "
                   "at a CPU test's size")
    p.add_argument("--eval-every", type=int, default=None, help="also evaluate every N steps")
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--price-per-device-hour", type=float, default=None)
    p.add_argument("--results-dir", type=Path, default=None,
                   help="also write the table to DIR/demo_<device class>.md (e.g. benchmarks/results)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    cfg = DemoConfig(device=args.device, model=args.model)
    if args.device == "cuda":
        cfg = replace(cfg, **CUDA_DEFAULTS, world_size=torch.cuda.device_count())
    if args.preset:
        cfg = replace(cfg, **PRESETS[args.preset])
    if args.smoke:
        cfg = replace(cfg, **SMOKE)
    for key in ("world_size", "steps", "price_per_device_hour", "eval_every"):
        if getattr(args, key) is not None:
            cfg = replace(cfg, **{key: getattr(args, key)})
    if cfg.world_size < 1:
        p.error(f"--world-size must be >= 1, got {cfg.world_size}")
    if cfg.device == "cuda" and cfg.world_size > torch.cuda.device_count():
        p.error(f"--world-size {cfg.world_size}: only {torch.cuda.device_count()} CUDA device(s); NCCL needs one per rank")
    if cfg.world_size == 1:
        print("note: world size 1 communicates nothing; bytes communicated will be 0 for both runs")
    if cfg.steps < 2:
        p.error(f"--steps must be >= 2 (step 0 is not timed), got {cfg.steps}")
    out = args.out or Path("runs") / f"demo-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    command = "python -m deepseek_ext.demo " + " ".join(argv if argv is not None else sys.argv[1:])
    run_demo(cfg, out, ablate=args.ablate, results_dir=args.results_dir, command=command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
