"""Dynamic batching: variable-length samples packed into batches of about a
constant number of tokens."""

from __future__ import annotations

from typing import Iterator, List, Sequence

import numpy as np
from torch.utils.data import Sampler


class TokenBudgetBatcher(Sampler[List[int]]):
    """A batch sampler whose batches cost at most ``max_tokens`` padded tokens:
    ``len(batch) * padded_max_length(batch) <= max_tokens`` for every batch.

    Each epoch the indices are shuffled, cut into pools of ``pool_size``
    samples, each pool is sorted by length (longest first) and cut greedily
    into batches, and the batches are shuffled. Sorting inside pools makes the
    samples of a batch about equally long (little padding) while keeping the
    order random at the scale of the dataset. With ``world_size > 1`` rank r
    gets batches r, r + W, ... of the same epoch order, all ranks the same
    number (the last ``len % W`` batches are left out).

    Use it as ``DataLoader(ds, batch_sampler=TokenBudgetBatcher(ds.lengths, 8192),
    collate_fn=pad_collate)``; call ``set_epoch(e)`` each epoch for a new order.

    Args:
        lengths: length of every sample (tokens).
        max_tokens: budget per batch, padding included.
        shuffle: shuffle samples and batches (False: sorted pools in index order).
        seed: base seed; the epoch is added.
        pool_size: samples sorted together (default: the whole dataset, capped at 100 * max_tokens / mean length).
        pad_multiple: lengths are padded up to a multiple of this (e.g. 8 for tensor cores).
        max_batch_size: an optional cap on samples per batch.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0,
                 pool_size: int | None = None, pad_multiple: int = 1, max_batch_size: int | None = None,
                 rank: int = 0, world_size: int = 1):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence of ints")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple must be a positive int, got {pad_multiple!r}")
        if self.lengths.min() < 1:
            raise ValueError(f"lengths must be >= 1, got {int(self.lengths.min())}")
        self.padded = -(-self.lengths // pad_multiple) * pad_multiple
        if self.padded.max() > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} is smaller than the longest sample "
                             f"({int(self.padded.max())} tokens after padding); cut the samples shorter")
        if not isinstance(world_size, int) or world_size < 1 or not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank!r}, world_size={world_size!r}")
        if pool_size is None:
            pool_size = int(min(len(self.lengths), max(1, 100 * max_tokens / self.lengths.mean())))
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.pool_size, self.max_batch_size = pool_size, max_batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._cache = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self, epoch: int | None = None) -> List[List[int]]:
        """The batches of every rank for an epoch, in order."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        batches = []
        cap = self.max_batch_size or len(self.lengths)
        for p in range(0, len(order), self.pool_size):
            pool = order[p:p + self.pool_size]
            pool = pool[np.argsort(-self.padded[pool], kind="stable")]
            batch, longest = [], 0
            for idx in pool.tolist():
                L = int(self.padded[idx])
                if batch and ((len(batch) + 1) * max(longest, L) > self.max_tokens or len(batch) >= cap):
                    batches.append(batch)
                    batch, longest = [], 0
                batch.append(idx)
                longest = max(longest, L)
            if batch:
                batches.append(batch)
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.all_batches()
        n = len(batches) // self.world_size
        return iter(batches[self.rank:n * self.world_size:self.world_size])

    def __len__(self) -> int:
        return len(self.all_batches()) // self.world_size

    def stats(self, epoch: int | None = None) -> dict:
        """Token accounting of an epoch (all ranks): ``padding_fraction`` = padded slots
        that hold no token / all slots; ``budget_waste`` = 1 - real tokens / (batches * max_tokens)."""
        batches = self.all_batches(epoch)
        real = sum(int(self.lengths[b].sum()) for b in batches)
        slots = sum(len(b) * int(self.padded[b].max()) for b in batches)
        return {"batches": len(batches), "tokens": real, "padded_slots": slots,
                "padding_fraction": 1 - real / slots,
                "budget_waste": 1 - real / (len(batches) * self.max_tokens),
                "max_batch_tokens": max(len(b) * int(self.padded[b].max()) for b in batches)}
