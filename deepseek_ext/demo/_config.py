"""The demo's configuration (sizes per device, the token budget) and its corpus."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import torch

from deepseek_ext.recipe import ModelConfig


@dataclass(frozen=True)
class DemoConfig:
    device: str = "cpu"
    model: str = "gpt"  # gpt (ours) | hf-gpt2 | hf-llama (Hugging Face, converted by Recipe.apply)
    world_size: int = 2
    steps: int = 240
    batch_size: int = 16  # sequences per rank and step
    seq_len: int = 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_windows: int = 128
    train_corpus_mb: float = 4.0
    num_workers: int = 1  # DataLoader workers per rank, the same for both runs
    price_per_device_hour: float = 0.05  # USD; CPU: one process = one device (a cloud vCPU pair is ~$0.05-0.10/h)
    seed: int = 0
    eval_every: int = 0  # also evaluate every N steps (0: at the end only): the time to the baseline's loss
    preset: str = ""  # the preset these sizes came from (PRESETS), for the report
    amp_dtype: str = "float16"  # mixed precision's autocast dtype on CUDA (Recipe.amp_dtype)
    baseline_amp: bool = False  # the baseline runs in mixed precision too (a fair GPU baseline: bf16)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           d_ff=self.d_ff, max_seq_len=self.seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.world_size * self.batch_size * self.seq_len


SMOKE = dict(steps=12, batch_size=4, seq_len=32, d_model=64, n_layers=4, n_heads=2, d_ff=256, warmup_steps=2,
             eval_windows=8, train_corpus_mb=0.3, num_workers=0)
CUDA_DEFAULTS = dict(steps=600, batch_size=32, seq_len=512, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                     lr=1e-3, warmup_steps=60, train_corpus_mb=48.0, num_workers=2, price_per_device_hour=3.0,
                     eval_windows=256)


# GPT-2 small's architecture (12 layers, d_model 768, 12 heads, context 1024; 85 M
# parameters outside the embedding, which the demo's byte vocabulary keeps small)
# on one GPU, sized so that the baseline, the low-cost run and its fp16 row finish
# in about 4 minutes of an H100/H200 with start-up and evaluation. Both runs use
# bf16 autocast, fused AdamW and SDPA attention: a strong baseline.
GPT2_SMALL = dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, seq_len=1024, batch_size=16, steps=1200,
                  lr=6e-4, warmup_steps=60, eval_windows=64, eval_every=150, train_corpus_mb=48.0, num_workers=2,
                  price_per_device_hour=3.0, world_size=1, amp_dtype="bfloat16", baseline_amp=True,
                  preset="gpt2-small")
# The same preset (same model class, recipe switches, code path) at a size a CPU
# test runs in a minute: what the GPU run could fail on is caught in CI.
GPT2_SMALL_TINY = dict(GPT2_SMALL, d_model=64, n_layers=4, n_heads=2, d_ff=256, seq_len=64, batch_size=4, steps=12,
                       warmup_steps=2, eval_windows=8, eval_every=4, train_corpus_mb=0.3, num_workers=0,
                       preset="gpt2-small-tiny")
PRESETS = {"gpt2-small": GPT2_SMALL, "gpt2-small-tiny": GPT2_SMALL_TINY}

# Dense bf16 tensor-core peak FLOP/s (no sparsity), for model FLOPs utilisation.
BF16_PEAK_FLOPS = {"h100": 989e12, "h100 pcie": 756e12, "h200": 989e12, "a100": 312e12}


# -- the corpus: real text that every Python installation has --------------------
def demo_corpus(train_bytes: float, eval_bytes: float = 256e3) -> Tuple[List[str], List[str]]:
    """Standard-library ``.py`` files in sorted order: every 20th file is held out
    for evaluation; the others are taken until ``train_bytes`` is reached."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    if not files:
        raise RuntimeError(f"no Python source files under {root}: the demo needs the standard library's sources")
    # Held out: every 20th file of the whole library, taken in a fixed random order
    # until eval_bytes; training: the other files in sorted order until train_bytes.
    candidates = files[::20]
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(1234)).tolist()
    held_out, n_eval = [], 0
    for i in order:
        if n_eval >= eval_bytes:
            break
        held_out.append(str(candidates[i]))
        n_eval += candidates[i].stat().st_size
    train, n_train = [], 0
    for i, p in enumerate(files):
        if n_train >= train_bytes:
            break
        if i % 20:
            train.append(str(p))
            n_train += p.stat().st_size
    return train, sorted(held_out)
