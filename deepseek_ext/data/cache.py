"""A byte-budgeted LRU cache for hot samples."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()  # what the entry keeps alive
    if isinstance(value, (tuple, list)):
        # Views of one storage (e.g. inputs/targets of one window) are counted once.
        seen, total = set(), 0
        for v in value:
            if isinstance(v, torch.Tensor):
                key = v.untyped_storage().data_ptr()
                if key in seen:
                    continue
                seen.add(key)
            total += _nbytes(v)
        return total
    raise TypeError(f"value must be a tensor or a tuple/list of tensors, got {type(value).__name__}")


class HotSampleCache:
    """Least-recently-used cache of samples (tensors or tuples of tensors) that
    holds at most ``max_bytes`` of tensor storage.

    ``get`` counts a hit or a miss; ``put`` evicts the least recently used
    entries until the new one fits (an entry larger than the whole budget is
    not stored). Safe to share between threads. In ``DataLoader`` worker
    processes each worker holds its own copy (and its own statistics).
    """

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.bytes = 0

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        return key in self._data

    def get(self, key, default=None):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return default

    def put(self, key, value) -> bool:
        """Store value under key; returns False when it is larger than the budget."""
        size = _nbytes(value)
        with self._lock:
            if key in self._data:
                self.bytes -= self._sizes.pop(key)
                del self._data[key]
            if size > self.max_bytes:
                return False
            while self.bytes + size > self.max_bytes:
                old, _ = self._data.popitem(last=False)
                self.bytes -= self._sizes.pop(old)
                self.evictions += 1
            self._data[key] = value
            self._sizes[key] = size
            self.bytes += size
            return True

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self.bytes = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "evictions": self.evictions, "entries": len(self._data), "bytes": self.bytes,
                "max_bytes": self.max_bytes}

    def __getstate__(self):  # picklable for DataLoader workers (a lock is not)
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
