"""The demo's models: our GPT (:meth:`Recipe.build_model`) or a Hugging Face
model built from a tiny random config in code (nothing is downloaded), to which
the recipe is applied with :meth:`Recipe.apply` (the converters)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deepseek_ext.recipe import ModelConfig, Recipe

MODELS = ("gpt", "hf-gpt2", "hf-llama")


class LogitsOnly(nn.Module):
    """A Hugging Face causal LM as the demo calls its models: ``tokens -> logits``
    (no KV cache in training)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits


def hf_model(kind: str, cfg: ModelConfig) -> nn.Module:
    """``hf-gpt2``: ``GPT2LMHeadModel`` (GELU-tanh MLP, tied head); ``hf-llama``:
    ``LlamaForCausalLM`` (SwiGLU MLP of width ``d_ff``, RoPE, RMSNorm, untied
    head). Both at the demo's sizes, random init, no dropout."""
    if kind == "hf-gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout))
    if kind == "hf-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
            max_position_embeddings=cfg.max_seq_len, attention_dropout=cfg.dropout, tie_word_embeddings=False))
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {kind!r}")


def build_model(kind: str, recipe: Recipe, cfg: ModelConfig, n_layers: Optional[int] = None) -> nn.Module:
    """The demo's model for ``kind`` with ``recipe``'s model techniques on."""
    if kind == "gpt":
        return recipe.build_model(cfg, n_layers=n_layers)
    if recipe.progressive:
        raise ValueError("progressive training grows the demo's own model (--model gpt) only")
    model = hf_model(kind, cfg)
    recipe.apply(model)
    return LogitsOnly(model)


def ffn_flops_per_token(kind: str, recipe: Recipe, cfg: ModelConfig, model: nn.Module) -> int:
    """Forward FFN FLOPs per token of the whole stack (gate GEMMs included)."""
    if kind == "gpt":
        return recipe.ffn_flops_per_token(cfg)
    from deepseek_ext.nn import GatedSparseFFN, ffn_flops

    sparse = [m for m in model.modules() if isinstance(m, GatedSparseFFN)]
    if sparse:
        return sum(int(ffn_flops(m.d_model, m.d_ff, n_blocks=m.n_blocks, density=m.density,
                                 shared_blocks=m.shared_blocks, activation=m.activation)["sparse"]) for m in sparse)
    act = "swiglu" if kind == "hf-llama" else "gelu_tanh"
    return int(ffn_flops(cfg.d_model, cfg.d_ff, activation=act)["dense"]) * cfg.n_layers


def model_flops_per_token(cfg: ModelConfig, ffn_flops: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward, no recomputation):
    per layer the attention projections ``8 d^2`` and the attention scores and
    values ``4 s d`` (the full square, the usual MFU convention), the FFN's
    ``ffn_flops`` (the whole stack's, sparse or dense), and the output head
    ``2 d V``. Sharing weights changes none of it."""
    d, s = cfg.d_model, cfg.max_seq_len
    return 3 * (cfg.n_layers * (8 * d * d + 4 * s * d) + int(ffn_flops) + 2 * d * cfg.vocab_size)
