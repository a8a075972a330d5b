"""Typed Python wrappers and fake (meta) kernels for ``torch.ops.deepseek_ext``.

Each wrapper normalises its arguments and calls the op's ``.default`` overload;
the C++ schemas in ``csrc/ops/library.cpp`` are the contract. The fake kernels
repeat the C++ shape and dtype checks with ``torch._check`` so that
``torch.compile`` and meta tensors see the same errors as eager code.
"""

from typing import Optional, Sequence

import torch

__all__ = ["unscale_and_check_", "matmul_unscale_check", "update_scale_"]

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


def matmul_unscale_check(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_scale: torch.Tensor,
    found_inf: torch.Tensor,
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``(a @ b) * inv_scale`` with float32 accumulation and a fused overflow check.

    The weight-gradient GEMM of mixed-precision training: ``a`` is typically
    ``grad_out.t()`` (a transposed view, not copied) and ``b`` the layer input.

    Args:
        a: ``[M, K]`` float16 or bfloat16 (float32 accepted too).
        b: ``[K, N]``, same dtype and device as ``a``.
        inv_scale: 1-element float32 tensor on the device (never read by the host).
        found_inf: 1-element float32 tensor; set to 1.0 if any output element is
            inf or NaN after conversion to ``out_dtype`` (never cleared).
        out_dtype: ``torch.float32`` (master gradients) or ``a.dtype`` (default).

    Returns:
        ``[M, N]`` tensor of ``out_dtype``.
    """
    return torch.ops.deepseek_ext.matmul_unscale_check.default(a, b, inv_scale, found_inf, out_dtype=out_dtype)


@torch.library.register_fake("deepseek_ext::matmul_unscale_check")
def _matmul_unscale_check_fake(a, b, inv_scale, found_inf, *, out_dtype=None):
    torch._check(a.dim() == 2, lambda: f"a must be a 2-D matrix, got shape {tuple(a.shape)}")
    torch._check(b.dim() == 2, lambda: f"b must be a 2-D matrix, got shape {tuple(b.shape)}")
    torch._check(
        a.shape[1] == b.shape[0],
        lambda: f"a and b shapes cannot be multiplied: a is {tuple(a.shape)}, b is {tuple(b.shape)}",
    )
    torch._check(a.dtype in _FLOAT_DTYPES, lambda: f"a must be float16, bfloat16 or float32, got {a.dtype}")
    torch._check(b.dtype == a.dtype, lambda: f"b must have a's dtype ({a.dtype}), got {b.dtype}")
    _check_scalar_tensor(inv_scale, "inv_scale")
    _check_scalar_tensor(found_inf, "found_inf")
    out = a.dtype if out_dtype is None else out_dtype
    torch._check(
        out in (torch.float32, a.dtype),
        lambda: f"out_dtype must be float32 or the inputs' dtype ({a.dtype}), got {out}",
    )
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out)


def update_scale_(
    scale: torch.Tensor,
    growth_tracker: torch.Tensor,
    hysteresis_tracker: torch.Tensor,
    skip_counts: torch.Tensor,
    found_inf: torch.Tensor,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    hysteresis: int = 1,
    min_scale: float = 1.0,
    max_scale: float = 2.0**24,
) -> None:
    """One optimizer step of the dynamic loss scaler, on the device, in place.

    On overflow (``found_inf != 0``) the step counts as skipped and uses one
    unit of hysteresis; once none is left the scale is multiplied by
    ``backoff_factor``. After ``growth_interval`` clean steps in a row it is
    multiplied by ``growth_factor`` and the hysteresis budget refills. The scale
    stays a power of two in ``[min_scale, max_scale]``.

    Args:
        scale: float32[1].  growth_tracker: int32[1] (clean steps in a row).
        hysteresis_tracker: int32[1] (overflows still tolerated).
        skip_counts: int64[2] (consecutive skipped steps, total skipped steps).
        found_inf: float32[1].
    """
    torch.ops.deepseek_ext.update_scale_.default(
        scale, growth_tracker, hysteresis_tracker, skip_counts, found_inf,
        float(growth_factor), float(backoff_factor), int(growth_interval), int(hysteresis),
        float(min_scale), float(max_scale),
    )


@torch.library.register_fake("deepseek_ext::update_scale_")
def _update_scale_fake(scale, growth_tracker, hysteresis_tracker, skip_counts, found_inf, growth_factor,
                       backoff_factor, growth_interval, hysteresis, min_scale, max_scale):
    for t, name, dtype, n in ((scale, "scale", torch.float32, 1), (growth_tracker, "growth_tracker", torch.int32, 1),
                              (hysteresis_tracker, "hysteresis_tracker", torch.int32, 1),
                              (skip_counts, "skip_counts", torch.int64, 2), (found_inf, "found_inf", torch.float32, 1)):
        torch._check(t.dtype == dtype, lambda: f"{name} must be a {dtype} tensor, got {t.dtype}")
        torch._check(t.numel() == n, lambda: f"{name} must have {n} element(s), got {t.numel()}")
    return None
