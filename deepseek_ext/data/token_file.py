"""Flat binary token files: text in, one array of token ids out.

``build_token_dataset`` writes, next to ``out_path``:

- ``out_path``                 the tokens, one flat little-endian uint16 (vocab <= 65536) or
                               uint32 array with no header (the nanoGPT / Megatron ``.bin``
                               layout, readable with ``np.memmap(out_path, dtype)``);
- ``out_path.idx.npy``          document start offsets, int64, ``num_docs + 1`` entries
                               (the last one is ``num_tokens``), in NumPy's ``.npy`` format;
- ``out_path.json``             metadata: dtype, counts, vocabulary size, tokenizer, sources;
- ``out_path.tokenizer.json``   for BPE: the tokenizer in Hugging Face ``tokenizers`` format.

Each input file is one document; the tokenizer's end-of-text id follows every
document. The metadata file is written last, so a build that fails half-way
leaves no loadable dataset behind, and nothing that exists is replaced unless
``overwrite=True``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from deepseek_ext.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

FORMAT = "deepseek_ext.tokens"
VERSION = 1
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class CorruptTokenFileError(ValueError):
    """The token file and its index/metadata do not agree."""


def sidecar_paths(out_path) -> dict:
    p = Path(out_path)
    return {"meta": p.with_name(p.name + ".json"), "index": p.with_name(p.name + ".idx.npy"),
            "tokenizer": p.with_name(p.name + ".tokenizer.json")}


@dataclass
class TokenDatasetInfo:
    """What ``build_token_dataset`` wrote (or ``load_token_dataset_info`` found)."""

    path: Path
    dtype: str
    num_tokens: int
    num_docs: int
    vocab_size: int
    tokenizer_kind: str
    eos_id: Optional[int]
    sources: list = field(default_factory=list)
    tokenizer_path: Optional[Path] = None

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 start offset of every document, plus num_tokens at the end."""
        return np.load(sidecar_paths(self.path)["index"], mmap_mode="r")

    @property
    def tokenizer(self):
        if self.tokenizer_kind == "byte":
            return ByteTokenizer()
        if self.tokenizer_path is None:
            raise ValueError(f"{self.path}: no tokenizer file was saved with this dataset")
        return HFTokenizer.from_file(self.tokenizer_path)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def encode(self, text) -> np.ndarray:
        return self.tokenizer.encode(text)


def _as_file_list(text_files) -> list:
    if isinstance(text_files, (str, os.PathLike)):
        text_files = [text_files]
    files = [Path(f) for f in text_files]
    if not files:
        raise ValueError("text_files is empty: give at least one text file")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"text_files: {f} does not exist")
        if not f.is_file():
            raise ValueError(f"text_files: {f} is not a regular file")
    return files


def build_token_dataset(text_files: Union[str, os.PathLike, Iterable], out_path,
                        tokenizer="byte", *, vocab_size: Optional[int] = None,
                        overwrite: bool = False) -> TokenDatasetInfo:
    """Tokenise text files into one flat token file plus index and metadata.

    Args:
        text_files: a path or an iterable of paths; each file is one document.
        out_path: the token file to write (its sidecars get suffixes, see the module doc).
        tokenizer: ``"byte"`` (257 ids: bytes + end-of-text), ``"bpe"`` (a byte-level
            BPE trained here, offline, on ``text_files``) or a ``tokenizers.Tokenizer``.
        vocab_size: vocabulary size of the BPE to train (default 8192).
        overwrite: replace existing output files; without it an existing file is an error.
    """
    files = _as_file_list(text_files)
    out_path = Path(out_path)
    side = sidecar_paths(out_path)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"out_path: directory {out_path.parent} does not exist")
    if not overwrite:
        for p in (out_path, side["meta"], side["index"]):
            if p.exists():
                raise FileExistsError(f"out_path: {p} exists; pass overwrite=True to replace it")
    tok = make_tokenizer(tokenizer, files, vocab_size)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    np_dtype = _DTYPES[dtype]

    tmp = {k: p.with_name(p.name + ".tmp") for k, p in side.items()}
    tmp_bin = out_path.with_name(out_path.name + ".tmp")
    offsets, n = [0], 0
    eos = np.asarray([tok.eos_id], dtype=np_dtype) if tok.eos_id is not None else None
    try:
        with open(tmp_bin, "wb") as out:
            batch = 64 if isinstance(tok, HFTokenizer) else 1
            for start in range(0, len(files), batch):
                chunk = files[start:start + batch]
                raw = [f.read_bytes() for f in chunk]
                if isinstance(tok, HFTokenizer):
                    ids_list = tok.encode_batch([r.decode("utf-8", errors="replace") for r in raw])
                else:
                    ids_list = [tok.encode(r) for r in raw]
                for ids in ids_list:
                    if len(ids) == 0:
                        continue  # an empty file is no document
                    out.write(ids.astype(np_dtype, copy=False).tobytes())
                    n += len(ids)
                    if eos is not None:
                        out.write(eos.tobytes())
                        n += 1
                    offsets.append(n)
        if n == 0:
            raise ValueError(f"text_files: the corpus of {len(files)} file(s) is empty (no tokens)")
        with open(tmp["index"], "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, np.asarray(offsets, dtype=np.int64), allow_pickle=False)
        tok_file = None
        if isinstance(tok, HFTokenizer):
            tok.save(tmp["tokenizer"])
            tok_file = side["tokenizer"]
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype, "num_tokens": n,
                "num_docs": len(offsets) - 1, "vocab_size": int(tok.vocab_size),
                "tokenizer": tok.kind, "eos_id": tok.eos_id,
                "tokenizer_file": tok_file.name if tok_file else None,
                "index_file": side["index"].name, "sources": [str(f) for f in files]}
        with open(tmp["meta"], "w") as f:
            json.dump(meta, f, indent=1)
        # Commit: data and index first, the metadata that makes it loadable last.
        os.replace(tmp_bin, out_path)
        os.replace(tmp["index"], side["index"])
        if tok_file:
            os.replace(tmp["tokenizer"], side["tokenizer"])
        os.replace(tmp["meta"], side["meta"])
    finally:
        for p in [tmp_bin, *tmp.values()]:
            if p.exists():
                p.unlink()
    return load_token_dataset_info(out_path)


def load_token_dataset_info(path) -> TokenDatasetInfo:
    """Read and check the metadata and index of a token file written by build_token_dataset."""
    path = Path(path)
    side = sidecar_paths(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: token file {path} does not exist")
    if not side["meta"].is_file():
        raise FileNotFoundError(f"path: metadata {side['meta']} of token file {path} does not exist")
    try:
        meta = json.loads(side["meta"].read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptTokenFileError(f"path: metadata {side['meta']} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptTokenFileError(f"path: {side['meta']} is not a {FORMAT} metadata file")
    try:
        dtype, n, ndocs = meta["dtype"], int(meta["num_tokens"]), int(meta["num_docs"])
        vocab = int(meta["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptTokenFileError(f"path: metadata {side['meta']} lacks or mangles {e}") from None
    if dtype not in _DTYPES:
        raise CorruptTokenFileError(f"path: metadata dtype must be uint16 or uint32, got {dtype!r}")
    size = path.stat().st_size
    if size != n * np.dtype(_DTYPES[dtype]).itemsize:
        raise CorruptTokenFileError(
            f"path: {path} holds {size} bytes but the metadata says {n} {dtype} tokens "
            f"({n * np.dtype(_DTYPES[dtype]).itemsize} bytes): truncated or not the same build")
    try:
        offsets = np.load(side["index"], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CorruptTokenFileError(f"path: index {side['index']} cannot be read ({e})") from None
    if (offsets.ndim != 1 or len(offsets) != ndocs + 1 or offsets[0] != 0 or offsets[-1] != n
            or (len(offsets) > 1 and np.any(np.diff(offsets) <= 0))):
        raise CorruptTokenFileError(
            f"path: index {side['index']} does not match the metadata ({ndocs} documents, "
            f"{n} tokens, strictly increasing offsets from 0)")
    tok_path = side["tokenizer"] if meta.get("tokenizer_file") else None
    return TokenDatasetInfo(path=path, dtype=dtype, num_tokens=n, num_docs=ndocs, vocab_size=vocab,
                            tokenizer_kind=meta.get("tokenizer", "byte"), eos_id=meta.get("eos_id"),
                            sources=meta.get("sources", []), tokenizer_path=tok_path)
