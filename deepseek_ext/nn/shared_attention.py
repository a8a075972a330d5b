"""Shared-attention layers: attention parameters shared across transformer layers.

:class:`SharedAttention` holds real ``nn.Parameter`` s and calls the C++ op
``torch.ops.deepseek_ext.shared_attention`` (fused QKV projection, ATen's
``scaled_dot_product_attention``, output projection); the C++ module
``deepseek_ext::nn::SharedAttention`` calls the same op.

:class:`SharedAttentionTransformer` is a pre-norm transformer LM whose blocks
use the same attention module object wherever the sharing plan says so, so a
shared parameter appears once in ``parameters()`` and its gradient is the sum
over the layers that use it. Plans (Takase & Kiyono 2021, plus ``"all"``)::

    none           0 1 2 3 4 5
    all            0 0 0 0 0 0
    sequence       0 0 1 1 2 2      (n_unique = 3)
    cycle          0 1 2 0 1 2
    cycle_reverse  0 1 2 2 1 0

:func:`parameter_report` counts parameters and Adam state for a model or a
configuration against the same model unshared (and unfactorised);
:func:`parameter_formula` is its closed form.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SharedAttention",
    "SharedAttentionTransformer",
    "SharedAttentionConfig",
    "SHARING_PLANS",
    "sharing_plan",
    "parameter_formula",
    "parameter_report",
]

SHARING_PLANS = ("none", "all", "sequence", "cycle", "cycle_reverse")
_ACTIVATIONS = ("gelu", "relu", "silu")


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


# ---- Factorised embedding: recompute the two narrow [B, T, E] activations ----
#
# With embed_dim = E < d_model, plain autograd saves two [B, T, E] tensors that
# the unfactorised model does not have: the input of emb_proj (tok_emb(tokens) +
# pos_emb) and the input of the LM head (head_proj's output). Both are cheap to
# recompute in backward, from the token ids (a gather and an add) and from
# head_proj's input (saved anyway, as this function's own input), so these two
# functions save neither. Forward values are those of the plain composition (the
# same ops in the same order, autocast included); gradients equal it to rounding.
# Backward computes in the dtype the forward's linears ran in (the autocast dtype
# under autocast: the output's dtype) and returns each gradient in its input's dtype.

class _FactorisedEmbedding(torch.autograd.Function):
    """linear(tok_w[tokens] + pos_w[:T], proj_w, proj_b), saving tokens, not the sum."""

    @staticmethod
    def forward(ctx, tokens: Tensor, tok_w: Tensor, pos_w: Tensor, proj_w: Tensor,
                proj_b: Optional[Tensor]) -> Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        out = F.linear(F.embedding(tokens, tok_w) + F.embedding(pos, pos_w), proj_w, proj_b)
        ctx.save_for_backward(tokens, pos, tok_w, pos_w, proj_w)
        ctx.bias_dtype = None if proj_b is None else proj_b.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        tokens, pos, tok_w, pos_w, proj_w = ctx.saved_tensors
        need_tok, need_pos, need_w, need_b = ctx.needs_input_grad[1:5]
        g_tok = g_pos = g_w = g_b = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if need_tok or need_pos:
            g_e = grad.matmul(proj_w.to(grad.dtype)).to(tok_w.dtype)  # [B, T, E]
            if need_tok:
                g_tok = torch.ops.aten.embedding_dense_backward(g_e, tokens, tok_w.shape[0], -1, False)
            if need_pos:
                g_pos = torch.ops.aten.embedding_dense_backward(g_e.sum(0).to(pos_w.dtype), pos,
                                                                pos_w.shape[0], -1, False)
        if need_w:  # recompute the sum (not kept past this block)
            e = (F.embedding(tokens, tok_w) + F.embedding(pos, pos_w)).to(grad.dtype)
            g_w = g2.t().matmul(e.reshape(-1, e.shape[-1])).to(proj_w.dtype)
            del e
        if need_b and ctx.bias_dtype is not None:
            g_b = g2.sum(0).to(ctx.bias_dtype)
        return None, g_tok, g_pos, g_w, g_b


class _FactorisedHead(torch.autograd.Function):
    """linear(linear(x, proj_w), out_w): the head of a factorised model, saving x, not
    the narrow [..., E] middle."""

    @staticmethod
    def forward(ctx, x: Tensor, proj_w: Tensor, out_w: Tensor) -> Tensor:
        ctx.save_for_backward(x, proj_w, out_w)
        return F.linear(F.linear(x, proj_w), out_w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, proj_w, out_w = ctx.saved_tensors
        need_x, need_proj, need_out = ctx.needs_input_grad
        g_x = g_proj = g_out = None
        g2 = grad.reshape(-1, grad.shape[-1])
        x_c, proj_c = x.to(grad.dtype), proj_w.to(grad.dtype)
        if need_out:  # recompute the narrow middle (not kept past this block)
            z = F.linear(x_c, proj_c)
            g_out = g2.t().matmul(z.reshape(-1, z.shape[-1])).to(out_w.dtype)
            del z
        if need_x or need_proj:
            g_z = grad.matmul(out_w.to(grad.dtype))  # [..., E]
            if need_proj:
                g_proj = g_z.reshape(-1, g_z.shape[-1]).t().matmul(x_c.reshape(-1, x_c.shape[-1]))
                g_proj = g_proj.to(proj_w.dtype)
            if need_x:
                g_x = g_z.matmul(proj_c).to(x.dtype)
        return g_x, g_proj, g_out


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
        return _FactorisedEmbedding.apply(tokens, self.tok_emb.weight, self.pos_emb.weight,
                                          self.emb_proj.weight, self.emb_proj.bias)

    @torch.jit.unused
    def _factorised_head(self, h: Tensor) -> Tensor:
        out_w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return _FactorisedHead.apply(h, self.head_proj.weight, out_w)

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


# ---- Accounting ----

COMPONENTS = ("embedding", "attention", "ffn", "norms", "head")


def _attention_params(d: int, h: int, hkv: int, bias: bool = True) -> int:
    qkv = (h + 2 * hkv) * (d // h)
    return qkv * d + d * d + ((qkv + d) if bias else 0)


def parameter_formula(config: Union[SharedAttentionConfig, Mapping]) -> Dict[str, int]:
    """Closed-form parameter count per component (and ``total``) of a configuration
    with the default dense FFN.

    With V vocab, L max_seq_len, d d_model, E embedding dim, f d_ff, N layers,
    hd = d / H, U_a / U_f unique attention / FFN modules::

        embedding = (V + L) E + [E != d] (E d + d)
        attention = U_a ((H + 2 Hkv) hd (d + 1) + d d + d)
        ffn       = U_f (2 d f + f + d)
        norms     = 4 d N + 2 d
        head      = [E != d] d E + [not tied] V E
    """
    cfg = _as_config(config)
    v, d, n, h, f, L = cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.max_seq_len
    e = cfg.embedding_dim
    hkv = cfg.n_kv_heads or h
    u_attn = len(set(cfg.attention_index()))
    u_ffn = len(set(cfg.ffn_index()))
    counts = {
        "embedding": (v + L) * e + ((e * d + d) if e != d else 0),
        "attention": u_attn * _attention_params(d, h, hkv),
        "ffn": u_ffn * (2 * d * f + f + d),
        "norms": 4 * d * n + 2 * d,
        "head": (d * e if e != d else 0) + (0 if cfg.tie_embeddings else v * e),
    }
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    return counts


def _as_config(config) -> SharedAttentionConfig:
    if isinstance(config, SharedAttentionConfig):
        return config.validate()
    if isinstance(config, Mapping):
        return SharedAttentionConfig(**config).validate()
    raise ValueError(f"config must be a SharedAttentionConfig or a mapping of its fields, got {type(config).__name__}")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _model_counts(model: SharedAttentionTransformer):
    """(plan, unshared) counts per component, from the modules themselves."""
    blocks = list(model.layers)
    plan = {
        "embedding": _numel(model.tok_emb) + _numel(model.pos_emb) + _numel(model.emb_proj),
        "attention": sum(_numel(a) for a in model.unique_attentions()),
        "ffn": sum(_numel(f) for f in model.unique_ffns()),
        "norms": sum(_numel(b.ln1) + _numel(b.ln2) for b in blocks) + _numel(model.ln_f),
        "head": _numel(model.head_proj) + (0 if model.lm_head is None else _numel(model.lm_head)),
    }
    base = parameter_formula(model.config.unshared())
    unshared = dict(plan)
    # Every use of a module counts in the unshared model; the embedding and head
    # are those of the unfactorised model.
    unshared["attention"] = sum(_numel(b.attn) for b in blocks)
    unshared["ffn"] = sum(_numel(b.ffn) for b in blocks)
    unshared["embedding"] = base["embedding"]
    unshared["head"] = base["head"]
    return plan, unshared


def parameter_report(model_or_config, *, dtype: Optional[torch.dtype] = None) -> dict:
    """Parameters and Adam optimizer-state bytes of a sharing plan vs the unshared model.

    Args:
        model_or_config: a :class:`SharedAttentionTransformer` (counted from its
            modules, so an ``ffn_factory`` FFN counts as built), a
            :class:`SharedAttentionConfig` or a mapping of its fields (counted
            by :func:`parameter_formula`).
        dtype: parameter dtype for the byte counts; default the model's first
            parameter's dtype, float32 for a configuration.

    The unshared baseline shares nothing and has no factorised embedding.
    Returns a dict with ``components`` (per component: params, params_unshared,
    saved), ``params``, ``params_unshared``, ``reduction`` (fraction saved),
    ``param_bytes``, ``adam_state_bytes`` (exp_avg + exp_avg_sq: 2 values per
    parameter), ``training_state_bytes`` (parameters + gradients + Adam state),
    each also ``*_unshared``, and ``training_state_bytes_saved``.
    """
    if isinstance(model_or_config, SharedAttentionTransformer):
        cfg = model_or_config.config
        plan, unshared = _model_counts(model_or_config)
        if dtype is None:
            dtype = next(model_or_config.parameters()).dtype
    else:
        cfg = _as_config(model_or_config)
        plan = parameter_formula(cfg)
        unshared = parameter_formula(cfg.unshared())
    dtype = torch.float32 if dtype is None else dtype
    nbytes = torch.empty((), dtype=dtype).element_size()
    total, total_u = sum(plan[c] for c in COMPONENTS), sum(unshared[c] for c in COMPONENTS)
    report = {
        "sharing": cfg.sharing,
        "n_unique_attention": len(set(cfg.attention_index())),
        "share_ffn": cfg.share_ffn,
        "embed_dim": cfg.embedding_dim,
        "dtype": str(dtype).replace("torch.", ""),
        "components": {c: {"params": plan[c], "params_unshared": unshared[c],
                           "saved": unshared[c] - plan[c]} for c in COMPONENTS},
        "params": total,
        "params_unshared": total_u,
        "reduction": 1.0 - total / total_u,
    }
    for suffix, n in (("", total), ("_unshared", total_u)):
        report["param_bytes" + suffix] = n * nbytes
        report["adam_state_bytes" + suffix] = 2 * n * nbytes
        report["training_state_bytes" + suffix] = 4 * n * nbytes
    report["training_state_bytes_saved"] = report["training_state_bytes_unshared"] - report["training_state_bytes"]
    return report
