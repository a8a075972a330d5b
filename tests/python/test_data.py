"""deepseek_ext.data: token files, memmap datasets, cache, batcher, prefetch."""

import json
import pickle
import sysconfig
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deepseek_ext.data import (CorruptTokenFileError, HotSampleCache, MemmapDocumentDataset,
                               MemmapTokenDataset, NaiveTextDataset, Prefetcher, TokenBudgetBatcher,
                               build_token_dataset, load_token_dataset_info, pad_collate)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = sorted((STDLIB / "json").glob("*.py")) + [STDLIB / "textwrap.py"]


def byte_stream(files):
    """The expected token stream of the byte tokenizer, built independently."""
    parts = []
    for f in files:
        b = np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.int64)
        if len(b):
            parts += [b, np.array([256])]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def byte_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "corpus.bin"
    return build_token_dataset(CORPUS, out)


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "corpus.bin"
    return build_token_dataset(CORPUS, out, "bpe", vocab_size=600)


# ---- building token files

def test_byte_file_holds_the_source_bytes(byte_file):
    stream = byte_stream(CORPUS)
    assert byte_file.num_tokens == len(stream) and byte_file.vocab_size == 257 and byte_file.dtype == "uint16"
    assert np.array_equal(np.fromfile(byte_file.path, dtype=np.uint16), stream)
    offs = np.asarray(byte_file.doc_offsets)
    assert byte_file.num_docs == len(CORPUS) and offs[0] == 0 and offs[-1] == len(stream)
    for k, f in enumerate(CORPUS):  # each document ends with EOS, right where the index says
        assert offs[k + 1] - offs[k] == f.stat().st_size + 1
    assert byte_file.decode(np.fromfile(byte_file.path, dtype=np.uint16)[:offs[1] - 1]) == CORPUS[0].read_text()


def test_bpe_file_round_trips_the_text(bpe_file):
    assert bpe_file.tokenizer_kind == "bpe" and bpe_file.vocab_size == 600 and bpe_file.dtype == "uint16"
    toks = np.fromfile(bpe_file.path, dtype=np.uint16)
    offs = np.asarray(bpe_file.doc_offsets)
    assert toks.max() < 600 and toks[offs[1] - 1] == bpe_file.eos_id
    for k in (0, len(CORPUS) - 1):
        assert bpe_file.decode(toks[offs[k]:offs[k + 1] - 1]) == CORPUS[k].read_text()
    assert bpe_file.num_tokens < byte_file_size() / 2  # it does compress


def byte_file_size():
    return sum(f.stat().st_size for f in CORPUS)


def test_build_accepts_a_tokenizers_object(bpe_file, tmp_path):
    info = build_token_dataset(CORPUS[:2], tmp_path / "again.bin", bpe_file.tokenizer.tokenizer)
    ref = np.fromfile(bpe_file.path, dtype=np.uint16)[:info.num_tokens]
    assert np.array_equal(np.fromfile(info.path, dtype=np.uint16), ref)


# ---- datasets

@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_windows_match_the_source_tokens(byte_file, seq_len):
    stream = byte_stream(CORPUS)
    ds = MemmapTokenDataset(byte_file.path, seq_len)
    assert len(ds) == (len(stream) - 1) // seq_len
    for i in [0, 1, len(ds) // 2, len(ds) - 1, -1]:
        x, y = ds[i]
        j = i % len(ds)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (seq_len,)
        assert torch.equal(x, torch.from_numpy(stream[j * seq_len:j * seq_len + seq_len]))
        assert torch.equal(y, torch.from_numpy(stream[j * seq_len + 1:j * seq_len + seq_len + 1]))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_reads_the_file_through_a_memmap_and_pickles_small(byte_file):
    ds = MemmapTokenDataset(byte_file.path, 32)
    ds[0]
    assert isinstance(ds.tokens, np.memmap)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000 < byte_file.num_tokens * 2  # workers get the path, not the tokens
    assert torch.equal(pickle.loads(blob)[5][0], ds[5][0])


@pytest.mark.parametrize("world", [2, 3, 5])
def test_rank_shards_cover_every_window_once(byte_file, world):
    seq = 16
    full = MemmapTokenDataset(byte_file.path, seq)
    all_windows = [tuple(full[i][0][:4].tolist()) + (i,) for i in range(len(full))]
    got = []
    for r in range(world):
        ds = MemmapTokenDataset(byte_file.path, seq, rank=r, world_size=world, drop_uneven=False)
        got += [ds.window_index(i) for i in range(len(ds))]
        for i in (0, len(ds) - 1):
            assert torch.equal(ds[i][0], full[ds.window_index(i)][0])
    assert sorted(got) == list(range(len(full))) == [w[-1] for w in all_windows]
    even = [MemmapTokenDataset(byte_file.path, seq, rank=r, world_size=world) for r in range(world)]
    assert len({len(d) for d in even}) == 1 and len(even[0]) == len(full) // world
    idx = [d.window_index(i) for d in even for i in range(len(d))]
    assert len(set(idx)) == len(idx)


def test_split_ranges_are_disjoint(byte_file):
    tr = MemmapTokenDataset(byte_file.path, 32, split=(0, 0.9))
    ev = MemmapTokenDataset(byte_file.path, 32, split=(0.9, 1.0))
    assert tr.end <= ev.start and tr.start + len(tr) * 32 + 1 <= tr.end
    stream = byte_stream(CORPUS)
    x, _ = ev[0]
    assert torch.equal(x, torch.from_numpy(stream[ev.start:ev.start + 32]))
    with pytest.raises(ValueError, match="split"):
        MemmapTokenDataset(byte_file.path, 32, split=(0.5, 0.5))


def test_dataloader_with_workers_gives_the_same_batches(byte_file):
    ds = MemmapTokenDataset(byte_file.path, 64)
    loader = DataLoader(ds, batch_size=8, num_workers=2)
    for k, (x, y) in enumerate(loader):
        if k == 3:
            break
        ref = torch.stack([ds[i][0] for i in range(8 * k, 8 * k + 8)])
        assert torch.equal(x, ref) and torch.equal(y[:, :-1], x[:, 1:])


def test_naive_dataset_windows_match_the_file_bytes():
    ds = NaiveTextDataset(CORPUS[:2], 50)
    b0 = np.frombuffer(CORPUS[0].read_bytes(), dtype=np.uint8).astype(np.int64)
    n0 = (len(b0) - 1) // 50
    assert len(ds) == n0 + (CORPUS[1].stat().st_size - 1) // 50
    x, y = ds[3]
    assert torch.equal(x, torch.from_numpy(b0[150:200])) and torch.equal(y, torch.from_numpy(b0[151:201]))
    b1 = np.frombuffer(CORPUS[1].read_bytes(), dtype=np.uint8).astype(np.int64)
    assert torch.equal(ds[n0][0], torch.from_numpy(b1[:50]))


def test_naive_dataset_with_bpe(bpe_file):
    ds = NaiveTextDataset(CORPUS[:1], 20, bpe_file)
    toks = np.fromfile(bpe_file.path, dtype=np.uint16).astype(np.int64)
    assert torch.equal(ds[2][0], torch.from_numpy(toks[40:60]))


# ---- cache

def test_cache_hit_statistics_match_a_reference_lru(byte_file):
    window_bytes = (16 + 1) * 8
    cache = HotSampleCache(3 * window_bytes)
    ds = MemmapTokenDataset(byte_file.path, 16, cache=cache)
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 6, size=300).tolist()
    ref, hits, misses, evictions = OrderedDict(), 0, 0, 0
    for i in pattern:
        x, _ = ds[i]
        assert torch.equal(x, MemmapTokenDataset(byte_file.path, 16)[i][0])
        if i in ref:
            hits += 1
            ref.move_to_end(i)
        else:
            misses += 1
            ref[i] = True
            if len(ref) > 3:
                ref.popitem(last=False)
                evictions += 1
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["entries"]) == (hits, misses, evictions, 3)
    assert s["bytes"] == 3 * window_bytes <= s["max_bytes"]
    assert cache.hit_rate == pytest.approx(hits / 300)


def test_cache_rejects_entries_above_the_budget():
    cache = HotSampleCache(100)
    assert not cache.put("big", torch.zeros(100, dtype=torch.int64))
    assert cache.put("small", torch.zeros(10, dtype=torch.int64)) and cache.bytes == 80
    assert cache.get("big") is None and cache.get("small") is not None
    assert (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(ValueError, match="max_bytes"):
        HotSampleCache(-1)


# ---- token-budget batching

@pytest.mark.parametrize("seed", range(3))
def test_batcher_respects_the_budget_and_wastes_little(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 513, size=3000)
    b = TokenBudgetBatcher(lengths, 4096, seed=seed)
    batches = list(b)
    assert sorted(i for bt in batches for i in bt) == list(range(3000))
    assert max(len(bt) * lengths[bt].max() for bt in batches) <= 4096
    s = b.stats()
    # Stated bounds: < 2% padding, < 10% of the budget unused over the epoch.
    assert s["padding_fraction"] < 0.02 and s["budget_waste"] < 0.10, s
    assert s["max_batch_tokens"] <= 4096


def test_batcher_epochs_ranks_and_errors():
    lengths = np.random.default_rng(0).integers(1, 100, size=500)
    b = TokenBudgetBatcher(lengths, 512, pad_multiple=8)
    e0 = list(b)
    assert all(len(bt) * (-(-lengths[bt].max() // 8) * 8) <= 512 for bt in e0)
    b.set_epoch(1)
    assert list(b) != e0
    b.set_epoch(0)
    assert list(b) == e0
    shards = [list(TokenBudgetBatcher(lengths, 512, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for bt in s for i in bt]
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatcher([10, 600], 512)
    with pytest.raises(ValueError, match="lengths"):
        TokenBudgetBatcher([], 512)


def test_document_dataset_through_the_batcher(byte_file):
    ds = MemmapDocumentDataset(byte_file.path, 256)
    assert ds.lengths.max() == 256 and ds.lengths.sum() == byte_file.num_tokens - byte_file.num_docs
    loader = DataLoader(ds, batch_sampler=TokenBudgetBatcher(ds.lengths, 1024), collate_fn=pad_collate)
    seen = 0
    for x, y in loader:
        assert x.numel() <= 1024
        mask = y != -100
        seen += int(mask.sum())
        assert torch.equal(x[:, 1:][mask[:, :-1] & mask[:, 1:]], y[:, :-1][mask[:, :-1] & mask[:, 1:]])
    assert seen == ds.lengths.sum()


# ---- prefetch

def test_prefetcher_cpu_yields_the_loader_batches(byte_file):
    ds = MemmapTokenDataset(byte_file.path, 32)
    loader = DataLoader(ds, batch_size=4)
    got = list(Prefetcher(loader, "cpu", depth=3))
    ref = list(loader)
    assert len(got) == len(ref) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, ref))
    pf = Prefetcher(loader, "cpu")
    for k, _ in enumerate(pf):  # leaving early stops the thread
        if k == 2:
            break
    assert pf.batches == 3


def test_prefetcher_raises_the_loader_error():
    def bad():
        yield torch.zeros(2)
        raise RuntimeError("loader broke")

    it = iter(Prefetcher(bad(), "cpu"))
    next(it)
    with pytest.raises(RuntimeError, match="loader broke"):
        next(it)


@pytest.mark.cuda
def test_prefetcher_cuda_copies_batches_to_the_device(byte_file):
    ds = MemmapTokenDataset(byte_file.path, 32)
    loader = DataLoader(ds, batch_size=4, pin_memory=False)
    got = list(Prefetcher(loader, "cuda", depth=2))
    ref = list(loader)
    assert all(g[0].is_cuda and torch.equal(g[0].cpu(), r[0]) for g, r in zip(got, ref))
    loader = DataLoader(ds, batch_size=4, pin_memory=True)
    assert all(torch.equal(g[1].cpu(), r[1]) for g, r in zip(Prefetcher(loader, "cuda"), ref))


# ---- bad input and no accidental overwrites

def test_bad_paths_and_empty_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_token_dataset([tmp_path / "nope.txt"], tmp_path / "o.bin")
    with pytest.raises(ValueError, match="not a regular file"):
        build_token_dataset([tmp_path], tmp_path / "o.bin")
    with pytest.raises(ValueError, match="text_files is empty"):
        build_token_dataset([], tmp_path / "o.bin")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        build_token_dataset([empty], tmp_path / "o.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]  # nothing left behind
    with pytest.raises(FileNotFoundError, match="out_path"):
        build_token_dataset(CORPUS[:1], tmp_path / "missing_dir" / "o.bin")
    with pytest.raises(ValueError, match="tokenizer"):
        build_token_dataset(CORPUS[:1], tmp_path / "o.bin", tokenizer="words")
    with pytest.raises(FileNotFoundError, match="token file"):
        MemmapTokenDataset(tmp_path / "o.bin", 8)


def test_nothing_is_overwritten_without_overwrite(tmp_path):
    out = tmp_path / "c.bin"
    build_token_dataset(CORPUS[:1], out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_token_dataset(CORPUS[1:3], out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    info = build_token_dataset(CORPUS[1:3], out, overwrite=True)
    assert info.num_docs == 2 and load_token_dataset_info(out).num_tokens == info.num_tokens


def test_corrupt_index_and_metadata_are_reported(tmp_path):
    out = tmp_path / "c.bin"
    build_token_dataset(CORPUS[:2], out)
    meta_path = tmp_path / "c.bin.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text("{not json")
    with pytest.raises(CorruptTokenFileError, match="not valid JSON"):
        MemmapTokenDataset(out, 8)
    meta_path.write_text(json.dumps({**meta, "num_tokens": meta["num_tokens"] + 1}))
    with pytest.raises(CorruptTokenFileError, match="truncated"):
        MemmapTokenDataset(out, 8)
    meta_path.write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(CorruptTokenFileError, match="dtype"):
        MemmapTokenDataset(out, 8)
    meta_path.write_text(json.dumps(meta))
    idx = tmp_path / "c.bin.idx.npy"
    good = np.load(idx)
    with open(idx, "wb") as f:
        np.save(f, good[::-1].copy())
    with pytest.raises(CorruptTokenFileError, match="index"):
        MemmapTokenDataset(out, 8)
    idx.write_bytes(b"garbage")
    with pytest.raises(CorruptTokenFileError, match="index"):
        MemmapTokenDataset(out, 8)


def test_bad_dataset_arguments(byte_file):
    with pytest.raises(ValueError, match="seq_len"):
        MemmapTokenDataset(byte_file.path, 0)
    with pytest.raises(ValueError, match="seq_len"):
        MemmapTokenDataset(byte_file.path, byte_file.num_tokens)
    with pytest.raises(ValueError, match="rank"):
        MemmapTokenDataset(byte_file.path, 8, rank=2, world_size=2)
    with pytest.raises(TypeError, match="cache"):
        MemmapTokenDataset(byte_file.path, 8, cache={})
