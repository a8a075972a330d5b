"""Tokenisers for the token files: raw bytes, or a BPE trained offline with
Hugging Face ``tokenizers`` (its JSON format is the one saved next to the data).

Both expose the same three things the rest of the package needs:
``encode(text | bytes) -> np.ndarray``, ``decode(ids) -> str`` and ``vocab_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

EOS_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255) plus an end-of-document id 256."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).ravel()
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` seen through the same interface."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos = tokenizer.token_to_id(EOS_TOKEN)
        self.eos_id = eos  # None when the tokenizer has no such token

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text) -> np.ndarray:
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", errors="replace")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list:
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).ravel()])

    def save(self, path) -> None:
        self.tokenizer.save(str(path))


def train_bpe(text_files: Iterable[Path], vocab_size: int = 8192) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) on the files, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be > 257 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(f) for f in text_files], trainer)
    return HFTokenizer(tok)


def make_tokenizer(tokenizer, text_files=None, vocab_size=None):
    """"byte", "bpe" (trained on text_files), a tokenizers.Tokenizer, or one of ours."""
    if isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        return tokenizer
    if tokenizer == "byte":
        if vocab_size not in (None, ByteTokenizer.vocab_size):
            raise ValueError(f"vocab_size is fixed at 257 for tokenizer='byte', got {vocab_size}")
        return ByteTokenizer()
    if tokenizer == "bpe":
        return train_bpe(text_files, vocab_size or 8192)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        Tokenizer = ()
    if Tokenizer and isinstance(tokenizer, Tokenizer):
        if vocab_size is not None:
            raise ValueError("vocab_size is only used with tokenizer='bpe'")
        return HFTokenizer(tokenizer)
    raise ValueError(f"tokenizer must be 'byte', 'bpe' or a tokenizers.Tokenizer, got {tokenizer!r}")
