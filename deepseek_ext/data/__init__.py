"""Data pipeline: token files, memory-mapped datasets, a hot-sample cache,
token-budget batching and device prefetch. Plugs into any ``DataLoader`` loop.

    info = build_token_dataset(files, "corpus.bin", tokenizer="bpe", vocab_size=8192)
    ds = MemmapTokenDataset("corpus.bin", seq_len=512, rank=rank, world_size=world, split=(0, 0.9))
    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=2, pin_memory=True)
    for inputs, targets in Prefetcher(loader, "cuda"):
        ...
"""

from deepseek_ext.data.batching import TokenBudgetBatcher
from deepseek_ext.data.cache import HotSampleCache
from deepseek_ext.data.dataset import (MemmapDocumentDataset, MemmapTokenDataset, NaiveTextDataset,
                                       pad_collate)
from deepseek_ext.data.prefetch import Prefetcher
from deepseek_ext.data.token_file import (CorruptTokenFileError, TokenDatasetInfo, build_token_dataset,
                                          load_token_dataset_info)
from deepseek_ext.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe

__all__ = ["build_token_dataset", "load_token_dataset_info", "TokenDatasetInfo", "CorruptTokenFileError",
           "MemmapTokenDataset", "MemmapDocumentDataset", "NaiveTextDataset", "pad_collate",
           "HotSampleCache", "TokenBudgetBatcher", "Prefetcher", "ByteTokenizer", "HFTokenizer", "train_bpe"]
