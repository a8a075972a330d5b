"""Shared attention: one attention module's parameters used by several
transformer layers (cross-layer parameter sharing, Takase & Kiyono 2021,
https://arxiv.org/abs/2104.06022).

:class:`SharedAttention` holds real ``nn.Parameter`` s and calls the C++ op
``torch.ops.deepseek_ext.shared_attention`` (fused QKV projection, ATen's
``scaled_dot_product_attention``, output projection); the C++ module
``deepseek_ext::nn::SharedAttention`` calls the same op. A model shares it by
using the same module object in several layers, so a shared parameter appears
once in ``parameters()`` and its gradient is the sum over the layers that use
it. :func:`sharing_plan` maps layers to unique modules (plans of Takase &
Kiyono, plus ``"all"``)::

    none           0 1 2 3 4 5
    all            0 0 0 0 0 0
    sequence       0 0 1 1 2 2      (n_unique = 3)
    cycle          0 1 2 0 1 2
    cycle_reverse  0 1 2 2 1 0

:class:`~deepseek_ext.nn.SharedAttentionTransformer` is a language model built
on them; :func:`~deepseek_ext.nn.parameter_report` counts what a plan saves.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

__all__ = ["SharedAttention", "SHARING_PLANS", "sharing_plan"]

SHARING_PLANS = ("none", "all", "sequence", "cycle", "cycle_reverse")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _dropout(value, name: str = "dropout") -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class SharedAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with a fused QKV projection.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: query heads (head_dim = d_model / n_heads).
        n_kv_heads: key/value heads, dividing ``n_heads`` (default ``n_heads``).
        dropout: attention-probability dropout, in training mode only.
        bias: add biases to the QKV and output projections.

    Parameters: ``qkv_weight`` [(n_heads + 2 n_kv_heads) head_dim, d_model],
    ``qkv_bias``, ``out_weight`` [d_model, d_model], ``out_bias`` (initialised
    as ``nn.Linear``).
    """

    __constants__ = ["d_model", "n_heads", "n_kv_heads", "dropout"]

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        _positive_int(d_model, "d_model")
        _positive_int(n_heads, "n_heads")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads is None:
            n_kv_heads = n_heads
        _positive_int(n_kv_heads, "n_kv_heads")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads must divide n_heads ({n_heads}), got {n_kv_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.dropout = _dropout(dropout)
        qkv_dim = (n_heads + 2 * n_kv_heads) * (d_model // n_heads)
        self.qkv_weight = nn.Parameter(torch.empty(qkv_dim, d_model))
        self.qkv_bias = nn.Parameter(torch.empty(qkv_dim)) if bias else None
        self.out_weight = nn.Parameter(torch.empty(d_model, d_model))
        self.out_bias = nn.Parameter(torch.empty(d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.d_model ** -0.5  # as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for p in (self.qkv_weight, self.qkv_bias, self.out_weight, self.out_bias):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; key_padding_mask bool [B, T], True = padding.

        Call with keywords (``attn(x, causal=True, key_padding_mask=m)``); the
        arguments are not keyword-only because TorchScript cannot compile those.
        """
        return torch.ops.deepseek_ext.shared_attention(
            x, self.qkv_weight, self.qkv_bias, self.out_weight, self.out_bias, self.n_heads,
            self.n_kv_heads, causal, key_padding_mask, self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"dropout={self.dropout}, bias={self.qkv_bias is not None}")


def sharing_plan(sharing: str, n_layers: int, n_unique: Optional[int] = None) -> List[int]:
    """Layer -> unique-module index for a sharing plan (see the module docstring).

    ``n_unique`` defaults to n_layers for ``"none"``, 1 for ``"all"`` and
    max(1, n_layers // 2) otherwise. ``"sequence"`` gives layer i module
    i * n_unique // n_layers; ``"cycle"`` i % n_unique; ``"cycle_reverse"``
    cycles for the first n_layers - n_unique layers, then runs n_unique-1 .. 0.
    """
    if sharing not in SHARING_PLANS:
        raise ValueError(f"sharing must be one of {', '.join(SHARING_PLANS)}, got {sharing!r}")
    _positive_int(n_layers, "n_layers")
    if n_unique is None:
        m = n_layers if sharing == "none" else 1 if sharing == "all" else max(1, n_layers // 2)
    else:
        m = n_unique
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n_layers:
            raise ValueError(f"n_unique must be an int in [1, n_layers = {n_layers}], got {n_unique!r}")
    if sharing == "none" and m != n_layers:
        raise ValueError(f"n_unique must equal n_layers ({n_layers}) for sharing='none', got {m}")
    if sharing == "all" and m != 1:
        raise ValueError(f"n_unique must be 1 for sharing='all', got {m}")
    if sharing == "none":
        return list(range(n_layers))
    if sharing == "all":
        return [0] * n_layers
    if sharing == "sequence":
        return [i * m // n_layers for i in range(n_layers)]
    if sharing == "cycle":
        return [i % m for i in range(n_layers)]
    return [i % m if i < n_layers - m else n_layers - 1 - i for i in range(n_layers)]
