"""Modules built on the deepseek_ext operators."""

from deepseek_ext.nn.linear import Linear

__all__ = ["Linear"]

# gated sparse FFN
from deepseek_ext.nn.sparse_ffn import GatedSparseFFN, ffn_flops  # noqa: E402

__all__ += ["GatedSparseFFN", "ffn_flops"]
