"""Typed Python wrappers and fake (meta) kernels for ``torch.ops.deepseek_ext``.

Each wrapper normalises its arguments and calls the op's ``.default`` overload;
the C++ schemas in ``csrc/ops/library.cpp`` are the contract. The fake kernels
repeat the C++ shape and dtype checks with ``torch._check`` so that
``torch.compile`` and meta tensors see the same errors as eager code.
"""

from typing import Sequence

import torch

__all__ = ["unscale_and_check_"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unscale_and_check_(
    grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor
) -> None:
    """Unscale gradients in place and flag inf/NaN, in one pass.

    Drop-in for ``torch._amp_foreach_non_finite_check_and_unscale_`` that also
    takes float16 and bfloat16 gradients, mixed in one list.

    Args:
        grads: tensors to multiply in place by ``inv_scale`` (float32, float16
            or bfloat16, all on one device; any strides).
        found_inf: 1-element float32 tensor on that device; set to 1.0 if any
            element of ``grads`` was inf or NaN, otherwise left unchanged.
        inv_scale: 1-element float32 tensor on that device, never read by the
            host. When it holds exactly 1.0, ``grads`` are only checked, not
            written.
    """
    grads = list(grads)
    for i, g in enumerate(grads):
        # Sparse tensors would not reach our kernels (the dispatcher would
        # complain about the backend instead of naming the argument).
        if g.layout != torch.strided:
            raise ValueError(f"grads[{i}] must be a strided (dense) tensor, got {g.layout}")
    torch.ops.deepseek_ext.unscale_and_check_.default(grads, found_inf, inv_scale)


def _check_scalar_tensor(t: torch.Tensor, name: str) -> None:
    torch._check(t.dtype == torch.float32, lambda: f"{name} must be a float32 tensor, got {t.dtype}")
    torch._check(
        t.numel() == 1, lambda: f"{name} must have exactly one element, got {t.numel()}"
    )


@torch.library.register_fake("deepseek_ext::unscale_and_check_")
def _unscale_and_check_fake(grads, found_inf, inv_scale):
    _check_scalar_tensor(found_inf, "found_inf")
    _check_scalar_tensor(inv_scale, "inv_scale")
    for i, g in enumerate(grads):
        torch._check(
            g.device == found_inf.device,
            lambda: f"grads[{i}] must be on the same device as found_inf "
            f"({found_inf.device}), got {g.device}",
        )
        torch._check(
            g.dtype in _FLOAT_DTYPES,
            lambda: f"grads[{i}] must be float32, float16 or bfloat16, got {g.dtype}",
        )
    return None
