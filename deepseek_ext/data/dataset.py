"""Map-style datasets over token files, and the naive text baseline."""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from deepseek_ext.data.cache import HotSampleCache
from deepseek_ext.data.token_file import _DTYPES, TokenDatasetInfo, _as_file_list, load_token_dataset_info
from deepseek_ext.data.tokenizer import make_tokenizer


def _check_split(split) -> Tuple[float, float]:
    if split is None:
        return 0.0, 1.0
    try:
        lo, hi = (float(x) for x in split)
    except (TypeError, ValueError):
        raise ValueError(f"split must be None or a (start_frac, end_frac) pair, got {split!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"split must satisfy 0 <= start_frac < end_frac <= 1, got {split!r}")
    return lo, hi


class _TokenFile:
    """Opens the memmap lazily, so that pickling a dataset into DataLoader
    workers sends the path, not the tokens (np.memmap pickles as a full copy)."""

    def _init_file(self, path):
        self.info = load_token_dataset_info(path)
        self.path = Path(path)
        self._np_dtype = _DTYPES[self.info.dtype]
        self._tokens = None

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self._np_dtype, mode="r")
        return self._tokens

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state


class MemmapTokenDataset(_TokenFile, Dataset):
    """Fixed-length training windows read straight from a memory-mapped token file.

    Window ``j`` of the split covers tokens ``[a + j*seq_len, a + j*seq_len + seq_len + 1)``
    where ``[a, b)`` is the split's token range; ``ds[i]`` returns
    ``(inputs, targets)``, two int64 views of one ``seq_len + 1`` buffer, targets
    shifted by one. The only copy is the uint16/uint32 -> int64 conversion of
    that window: no read of the whole file, no intermediate bytes.

    Sharding for DDP: rank ``r`` of ``world_size`` gets windows ``r, r + W, r + 2W, ...``.
    With ``drop_uneven=True`` (default) every rank gets ``num_windows // W`` windows
    (the last ``num_windows % W`` are left out, so that ranks stay in step);
    with False the ranks together cover every window exactly once.

    Args:
        path: token file written by ``build_token_dataset``.
        seq_len: tokens per sample.
        rank, world_size: this process's shard.
        split: ``(start_frac, end_frac)`` of the token stream, e.g. (0, 0.9) / (0.9, 1).
        cache: an optional ``HotSampleCache`` consulted before the file.
    """

    def __init__(self, path, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 split=None, cache: Optional[HotSampleCache] = None, drop_uneven: bool = True):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if cache is not None and not isinstance(cache, HotSampleCache):
            raise TypeError(f"cache must be a HotSampleCache or None, got {type(cache).__name__}")
        self._init_file(path)
        lo, hi = _check_split(split)
        n = self.info.num_tokens
        self.start, self.end = int(lo * n), int(hi * n)
        self.seq_len, self.rank, self.world_size, self.cache = seq_len, rank, world_size, cache
        self.num_windows = max(0, (self.end - self.start - 1) // seq_len)
        if drop_uneven:
            self._len = self.num_windows // world_size
        else:
            self._len = max(0, -(-(self.num_windows - rank) // world_size))
        if self._len == 0:
            raise ValueError(f"path: {path} has too few tokens ({self.end - self.start} in the split) "
                             f"for one window of seq_len={seq_len} per rank (world_size={world_size})")

    def __len__(self) -> int:
        return self._len

    def window_index(self, i: int) -> int:
        """Index among all windows of the split of this rank's sample i."""
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for a dataset of {self._len} windows")
        return self.rank + i * self.world_size

    def __getitem__(self, i: int):
        j = self.window_index(i)
        if self.cache is not None:
            hit = self.cache.get(j)
            if hit is not None:
                return hit
        s = self.start + j * self.seq_len
        window = torch.from_numpy(self.tokens[s:s + self.seq_len + 1].astype(np.int64))
        sample = (window[:-1], window[1:])
        if self.cache is not None:
            self.cache.put(j, sample)
        return sample

    def __getitems__(self, indices):
        """A whole batch in one gather (``DataLoader`` calls this with a batch's
        indices): one fancy-indexed read of the memmap into a ``[B, seq_len + 1]``
        int64 tensor, samples are views of its rows. Same values as ``ds[i]``."""
        if self.cache is not None:
            return [self[i] for i in indices]
        js = np.fromiter((self.window_index(int(i)) for i in indices), dtype=np.int64, count=len(indices))
        starts = self.start + js * self.seq_len
        rows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        batch = torch.from_numpy(rows.astype(np.int64, copy=False))
        return [(w[:-1], w[1:]) for w in batch]


class MemmapDocumentDataset(_TokenFile, Dataset):
    """Variable-length samples: every document of a token file, cut into pieces
    of at most ``max_len`` input tokens (pieces overlap by one token, so every
    target is predicted once). ``lengths[i]`` is sample i's length; feed them to
    ``TokenBudgetBatcher`` and collate with ``pad_collate``."""

    def __init__(self, path, max_len: int, *, split=None, min_len: int = 1):
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self._init_file(path)
        lo, hi = _check_split(split)
        offsets = np.asarray(self.info.doc_offsets)
        ndocs = len(offsets) - 1
        docs = range(int(lo * ndocs), int(hi * ndocs))
        starts, lengths = [], []
        for d in docs:
            a, b = int(offsets[d]), int(offsets[d + 1])
            for s in range(a, b - 1, max_len):
                length = min(max_len, b - 1 - s)
                if length >= min_len:
                    starts.append(s)
                    lengths.append(length)
        if not starts:
            raise ValueError(f"path: {path} has no document piece of at least min_len={min_len} tokens in the split")
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s, n = int(self.starts[i]), int(self.lengths[i])
        window = torch.from_numpy(self.tokens[s:s + n + 1].astype(np.int64))
        return window[:-1], window[1:]


def pad_collate(batch: Sequence, pad_id: int = 0, ignore_index: int = -100):
    """Pads (inputs, targets) pairs of different lengths into
    ``(inputs [B, T], targets [B, T])``; padded targets are ``ignore_index``
    (what ``F.cross_entropy`` skips by default)."""
    T = max(len(x) for x, _ in batch)
    inputs = torch.full((len(batch), T), pad_id, dtype=torch.int64)
    targets = torch.full((len(batch), T), ignore_index, dtype=torch.int64)
    for k, (x, y) in enumerate(batch):
        inputs[k, :len(x)] = x
        targets[k, :len(y)] = y
    return inputs, targets


class NaiveTextDataset(Dataset):
    """The baseline: a map-style dataset that, for every item, opens the text
    file holding the window, reads and decodes the whole file, tokenises it and
    slices the window out (what a pipeline without a preprocessing step does).

    Window ``j`` of a file covers its tokens ``[j*seq_len, j*seq_len + seq_len + 1)``,
    windows of the same length as ``MemmapTokenDataset``'s. The number of
    windows per file is known at construction: from the file size for the byte
    tokenizer, by tokenising each file once otherwise (that one-off cost is the
    naive pipeline's "build" time).
    """

    def __init__(self, text_files, seq_len: int, tokenizer="byte"):
        """tokenizer: "byte", a ``tokenizers.Tokenizer``, or the ``TokenDatasetInfo`` of a
        token file (its tokenizer, e.g. the BPE trained by ``build_token_dataset``)."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if tokenizer == "bpe":
            raise ValueError("tokenizer: NaiveTextDataset needs a trained tokenizer, not 'bpe' "
                             "(pass the TokenDatasetInfo from build_token_dataset, or its .tokenizer)")
        if isinstance(tokenizer, TokenDatasetInfo):
            tokenizer = tokenizer.tokenizer
        self.files = _as_file_list(text_files)
        self.seq_len = seq_len
        self.tokenizer = make_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        cum, total = [], 0
        for f in self.files:
            if self.tokenizer.kind == "byte":
                ntok = os.path.getsize(f)
            else:
                ntok = len(self.tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")))
            total += max(0, (ntok - 1) // seq_len)
            cum.append(total)
        if total == 0:
            raise ValueError(f"text_files: no file has more than seq_len={seq_len} tokens")
        self._cum = cum

    def __len__(self) -> int:
        return self._cum[-1]

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} windows")
        k = bisect.bisect_right(self._cum, i)
        j = i - (self._cum[k - 1] if k else 0)
        with open(self.files[k], encoding="utf-8", errors="replace") as f:
            text = f.read()
        ids = self.tokenizer.encode(text)
        w = torch.as_tensor(np.asarray(ids[j * self.seq_len:(j + 1) * self.seq_len + 1], dtype=np.int64))
        if len(w) < self.seq_len + 1:  # decoding replaced invalid bytes: pad with the last id
            w = torch.cat([w, w[-1:].expand(self.seq_len + 1 - len(w))])
        return w[:-1], w[1:]
