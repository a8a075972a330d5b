"""Factorised embedding (ALBERT, https://arxiv.org/abs/1909.11942) with the two
narrow ``[B, T, E]`` activations recomputed in backward instead of saved.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# With embed_dim = E < d_model, plain autograd saves two [B, T, E] tensors that
# the unfactorised model does not have: the input of emb_proj (tok_emb(tokens) +
# pos_emb) and the input of the LM head (head_proj's output). Both are cheap to
# recompute in backward, from the token ids (a gather and an add) and from
# head_proj's input (saved anyway, as this function's own input), so these two
# functions save neither. Forward values are those of the plain composition (the
# same ops in the same order, autocast included); gradients equal it to rounding.
# Backward computes in the dtype the forward's linears ran in (the autocast dtype
# under autocast: the output's dtype) and returns each gradient in its input's dtype.

class FactorisedEmbedding(torch.autograd.Function):
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


class FactorisedHead(torch.autograd.Function):
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
