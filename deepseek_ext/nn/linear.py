"""A drop-in ``torch.nn.Linear`` whose weight gradient is unscaled and checked
inside its GEMM."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from deepseek_ext import amp, ops

__all__ = ["Linear"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            w_c = weight.to(dtype)
            y = F.linear(x_c, w_c, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c, w_c)
        ctx.weight = weight  # the Parameter, to tell the scaler its grad comes unscaled
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.bias = bias  # the Parameter, as for the weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_c, w_c = ctx.saved_tensors
        weight = ctx.weight
        grad_y = grad_y.to(w_c.dtype)
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        xx = x_c.reshape(-1, x_c.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Stays scaled: unscaling the activation gradient would defeat the loss scale.
            grad_x = (grad_y @ w_c).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            scaler = amp.active_scaler()
            if scaler is not None and scaler._scale.device == gy.device:
                # dW = grad_out^T @ x, multiplied by 1/scale and checked for
                # overflow in the same kernel; written in the weight's dtype.
                grad_w = ops.matmul_unscale_check(gy.t(), xx, scaler._inv_scale, scaler._found_inf,
                                                  out_dtype=weight.dtype)
                scaler._mark_unscaled(weight)
            else:
                grad_w = (gy.t() @ xx).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            scaler = amp.active_scaler()
            if (scaler is not None and gy.device.type == "cpu" and scaler._scale.device == gy.device
                    and ctx.bias_dtype in (torch.float32, gy.dtype)):
                # On the CPU, as the GEMM ones(1, tokens) @ grad_out: unscaled and
                # checked like the weight's gradient, and without the float32 copy
                # of grad_out that ATen's 16-bit column sum with a float32 result
                # makes. (On CUDA that sum is one fast reduction; a one-row GEMM
                # would leave most of the GPU idle.)
                grad_b = ops.matmul_unscale_check(gy.new_ones(1, gy.shape[0]), gy, scaler._inv_scale,
                                                  scaler._found_inf, out_dtype=ctx.bias_dtype).view(-1)
                scaler._mark_unscaled(ctx.bias)
            else:
                grad_b = gy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` for mixed-precision training with a loss scale.

    Same parameters, ``state_dict`` and forward result as ``torch.nn.Linear``
    (computed in the autocast dtype when autocast is on). In backward, while a
    :class:`deepseek_ext.amp.DynamicLossScaler` is active, the weight gradient
    is computed by ``matmul_unscale_check``: float32 accumulation, multiplied by
    ``1/scale`` and checked for inf/NaN in the GEMM, written in the weight's
    dtype (float32 master weights get float32 gradients). The scaler then skips
    that gradient in ``unscale_``: one pass fewer than ``GradScaler``. On the
    CPU the bias gradient is computed the same way (the GEMM ``ones @
    grad_out``); on CUDA it is a float32 column sum that the scaler unscales.
    The input gradient stays scaled, as it must.

    Do not tie the weight of this layer to another module (a shared
    embedding/output matrix): the other module's share of the gradient would
    arrive scaled and be added to this unscaled one. Use ``torch.nn.Linear``
    for tied layers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFunction.apply(x, self.weight, self.bias, _compute_dtype(x))
