"""Parameter and optimizer-state accounting of attention sharing plans:
:func:`parameter_report` counts a model or a configuration against the same
model unshared (and unfactorised); :func:`parameter_formula` is its closed form.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from deepseek_ext.nn.shared_attention_transformer import SharedAttentionConfig, SharedAttentionTransformer

__all__ = ["parameter_formula", "parameter_report"]

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
