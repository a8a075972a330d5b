"""A pre-norm transformer language model whose layers share attention (and
optionally FFN) modules by a sharing plan, with an optional factorised embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepseek_ext.nn._factorised import FactorisedEmbedding, FactorisedHead
from deepseek_ext.nn.shared_attention import SharedAttention, _dropout, _positive_int, sharing_plan

__all__ = ["SharedAttentionConfig", "SharedAttentionBlock", "SharedAttentionTransformer", "DenseFFN"]

_ACTIVATIONS = ("gelu", "relu", "silu")


@dataclasses.dataclass(frozen=True)
class SharedAttentionConfig:
    """The hyperparameters of :class:`SharedAttentionTransformer` (all but ``ffn_factory``)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    sharing: str = "none"
    n_unique: Optional[int] = None
    share_ffn: bool = False
    embed_dim: Optional[int] = None
    n_kv_heads: Optional[int] = None
    dropout: float = 0.0
    causal: bool = True
    activation: str = "gelu"
    tie_embeddings: bool = True

    def validate(self) -> "SharedAttentionConfig":
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _positive_int(getattr(self, name), name)
        if self.embed_dim is not None:
            _positive_int(self.embed_dim, "embed_dim")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads is not None:
            _positive_int(self.n_kv_heads, "n_kv_heads")
            if self.n_heads % self.n_kv_heads != 0:
                raise ValueError(f"n_kv_heads must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}")
        _dropout(self.dropout)
        sharing_plan(self.sharing, self.n_layers, self.n_unique)
        return self

    @property
    def embedding_dim(self) -> int:
        return self.d_model if self.embed_dim is None else self.embed_dim

    def attention_index(self) -> List[int]:
        return sharing_plan(self.sharing, self.n_layers, self.n_unique)

    def ffn_index(self) -> List[int]:
        return self.attention_index() if self.share_ffn else list(range(self.n_layers))

    def unshared(self) -> "SharedAttentionConfig":
        """The baseline: nothing shared, no factorised embedding."""
        return dataclasses.replace(self, sharing="none", n_unique=None, share_ffn=False, embed_dim=None)


class DenseFFN(nn.Module):
    """Linear(d_model, d_ff), activation, Linear(d_ff, d_model)."""

    __constants__ = ["activation"]

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.silu(h)
        return self.fc2(h)


class SharedAttentionBlock(nn.Module):
    """Pre-norm block: x + drop(attn(ln1(x))), then + drop(ffn(ln2(.))).

    ``attn`` and ``ffn`` may be the same module objects as in other blocks;
    ``ln1`` and ``ln2`` are always the block's own.
    """

    def __init__(self, d_model: int, attn: SharedAttention, ffn: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = attn
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), causal=causal, key_padding_mask=key_padding_mask))
        return x + self.drop(self.ffn(self.ln2(x)))


class SharedAttentionTransformer(nn.Module):
    """A pre-norm transformer language model with cross-layer attention sharing.

    Args:
        vocab_size, d_model, n_layers, n_heads, d_ff, max_seq_len: the usual sizes.
        sharing: attention sharing plan, one of ``none``, ``all``, ``sequence``,
            ``cycle``, ``cycle_reverse``.
        n_unique: number of unique attention modules (see :func:`sharing_plan`).
        share_ffn: share the FFNs by the same plan (LayerNorms are never shared).
        embed_dim: factorised embedding vocab -> embed_dim -> d_model (ALBERT);
            None: no factorisation.
        n_kv_heads: key/value heads of every attention (grouped-query).
        dropout: attention, embedding and residual dropout.
        causal: causal attention (a decoder LM); False for an encoder.
        activation: default FFN activation (gelu, relu, silu).
        ffn_factory: ``ffn_factory(layer_index) -> nn.Module`` mapping
            [B, T, d_model] -> [B, T, d_model], used instead of the default dense
            FFN; called once per unique FFN, with the first layer that uses it.
        tie_embeddings: the LM head reuses the token embedding matrix.

    ``forward(tokens [B, T] int64, key_padding_mask=None) -> logits [B, T, vocab_size]``.
    Attributes: ``tok_emb``, ``pos_emb``, ``emb_proj`` (Identity unless factorised),
    ``layers`` (an ``nn.ModuleList`` of :class:`SharedAttentionBlock`), ``ln_f``,
    ``head_proj`` (Identity unless factorised), ``lm_head`` (None when tied),
    ``config`` (:class:`SharedAttentionConfig`).
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 max_seq_len: int, *, sharing: str = "none", n_unique: Optional[int] = None,
                 share_ffn: bool = False, embed_dim: Optional[int] = None,
                 n_kv_heads: Optional[int] = None, dropout: float = 0.0, causal: bool = True,
                 activation: str = "gelu", ffn_factory: Optional[Callable[[int], nn.Module]] = None,
                 tie_embeddings: bool = True):
        super().__init__()
        cfg = SharedAttentionConfig(
            vocab_size, d_model, n_layers, n_heads, d_ff, max_seq_len, sharing=sharing,
            n_unique=n_unique, share_ffn=share_ffn, embed_dim=embed_dim, n_kv_heads=n_kv_heads,
            dropout=dropout, causal=causal, activation=activation,
            tie_embeddings=tie_embeddings).validate()
        if ffn_factory is not None and not callable(ffn_factory):
            raise ValueError(f"ffn_factory must be callable (layer_index -> nn.Module), got {ffn_factory!r}")
        self.config = cfg
        self.causal = causal
        self.max_seq_len = max_seq_len
        e = cfg.embedding_dim
        self.factorised = e != d_model
        self.tok_emb = nn.Embedding(vocab_size, e)
        self.pos_emb = nn.Embedding(max_seq_len, e)
        self.emb_proj = nn.Linear(e, d_model) if e != d_model else nn.Identity()
        self.drop = nn.Dropout(dropout)

        self.attention_index = cfg.attention_index()
        self.ffn_index = cfg.ffn_index()
        attns: Dict[int, SharedAttention] = {}
        ffns: Dict[int, nn.Module] = {}
        blocks = []
        for i in range(n_layers):
            a, f = self.attention_index[i], self.ffn_index[i]
            if a not in attns:
                attns[a] = SharedAttention(d_model, n_heads, n_kv_heads, dropout)
            if f not in ffns:
                if ffn_factory is None:
                    ffns[f] = DenseFFN(d_model, d_ff, activation)
                else:
                    ffns[f] = ffn_factory(i)
                    if not isinstance(ffns[f], nn.Module):
                        raise ValueError(f"ffn_factory({i}) must return an nn.Module, got {type(ffns[f]).__name__}")
            blocks.append(SharedAttentionBlock(d_model, attns[a], ffns[f], dropout))
        self.layers = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head_proj = nn.Linear(d_model, e, bias=False) if e != d_model else nn.Identity()
        self.lm_head = None if tie_embeddings else nn.Linear(e, vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, tokens: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be a 2-D int64 tensor [batch, seq], got {tokens.dtype} "
                             f"with shape {list(tokens.shape)}")
        seq = tokens.shape[1]
        if seq > self.max_seq_len:
            raise ValueError(f"tokens.shape[1] ({seq}) must not exceed max_seq_len ({self.max_seq_len})")
        if self.factorised and not torch.jit.is_scripting():
            h = self._factorised_embedding(tokens)
        else:
            h = self.emb_proj(self.tok_emb(tokens) + self.pos_emb(torch.arange(seq, device=tokens.device)))
        h = self.drop(h)
        for block in self.layers:
            h = block(h, self.causal, key_padding_mask)
        h = self.ln_f(h)
        if self.factorised and not torch.jit.is_scripting():
            return self._factorised_head(h)
        h = self.head_proj(h)
        if self.lm_head is None:
            return F.linear(h, self.tok_emb.weight)
        return self.lm_head(h)

    # The autograd.Functions (used when embed_dim < d_model) that recompute the
    # narrow activations in backward; TorchScript, which cannot call them, runs
    # the plain composition instead (the same forward values).
    @torch.jit.unused
    def _factorised_embedding(self, tokens: Tensor) -> Tensor:
        return FactorisedEmbedding.apply(tokens, self.tok_emb.weight, self.pos_emb.weight,
                                          self.emb_proj.weight, self.emb_proj.bias)

    @torch.jit.unused
    def _factorised_head(self, h: Tensor) -> Tensor:
        out_w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return FactorisedHead.apply(h, self.head_proj.weight, out_w)

    def unique_attentions(self) -> List[SharedAttention]:
        """The distinct attention modules, in order of first use."""
        return _unique([block.attn for block in self.layers])

    def unique_ffns(self) -> List[nn.Module]:
        return _unique([block.ffn for block in self.layers])


def _unique(modules):
    seen, out = set(), []
    for m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out
