"""Modules built on the deepseek_ext operators."""

from deepseek_ext.nn.linear import Linear

__all__ = ["Linear"]

# gated sparse FFN
from deepseek_ext.nn.sparse_ffn import GatedSparseFFN, ffn_flops, update_balance  # noqa: E402

__all__ += ["GatedSparseFFN", "ffn_flops", "update_balance"]
# Shared-attention layers (cross-layer parameter sharing)
from deepseek_ext.nn.parameter_report import parameter_formula, parameter_report  # noqa: E402
from deepseek_ext.nn.shared_attention import SharedAttention, sharing_plan  # noqa: E402
from deepseek_ext.nn.shared_attention_transformer import (  # noqa: E402
    SharedAttentionConfig,
    SharedAttentionTransformer,
)

__all__ += [
    "SharedAttention",
    "SharedAttentionConfig",
    "SharedAttentionTransformer",
    "parameter_formula",
    "parameter_report",
    "sharing_plan",
]
