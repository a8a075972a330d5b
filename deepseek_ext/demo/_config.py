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

    def model(self, vocab_size: int) -> ModelConfig:
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
