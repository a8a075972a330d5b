"""Modules built on the deepseek_ext operators."""

from deepseek_ext.nn.linear import Linear

__all__ = ["Linear"]
