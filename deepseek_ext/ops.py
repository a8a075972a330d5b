"""Typed Python wrappers and fake (meta) kernels for ``torch.ops.deepseek_ext``.

Each wrapper normalises its arguments and calls the op's ``.default`` overload;
the C++ schemas in ``csrc/ops/library.cpp`` are the contract. The fake kernels
repeat the C++ shape and dtype checks with ``torch._check`` so that
``torch.compile`` and meta tensors see the same errors as eager code; they are
registered once the compiled library has defined the ops (see ``_loader``).
This module imports without the compiled library; calling an op without one
raises an error that says how to build it.
"""

from typing import Optional, Sequence

import torch

from deepseek_ext import _loader

__all__ = [
    # mixed precision: unscale + overflow check, fused GEMM, loss scaler step
    "unscale_and_check_", "matmul_unscale_check", "update_scale_",
    # 8-bit gradient quantisation
    "quantize_int8", "quantize_int8_ef_", "dequantize_int8", "dequantize_reduce_int8",
    # gated sparse FFN
    "sparse_ffn_route", "sparse_ffn", "sparse_ffn_backward", "sparse_ffn_gather", "sparse_ffn_combine",
    # shared attention
    "shared_attention",
]


def _ops():
    """``torch.ops.deepseek_ext``, once the compiled library is loaded."""
    if _loader._lib is None:
        _loader.library()  # raises why it is not, and how to build
    return torch.ops.deepseek_ext

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
        # Checked here as well as in the kernels: a CPU tensor in a CUDA list can crash
        # the process inside the CUDA kernel's launch instead of raising its error.
        if g.device != found_inf.device:
            raise RuntimeError(
                f"grads[{i}] must be on the same device as found_inf ({found_inf.device}), got {g.device}")
    _ops().unscale_and_check_.default(grads, found_inf, inv_scale)


def _check_scalar_tensor(t: torch.Tensor, name: str) -> None:
    torch._check(t.dtype == torch.float32, lambda: f"{name} must be a float32 tensor, got {t.dtype}")
    torch._check(
        t.numel() == 1, lambda: f"{name} must have exactly one element, got {t.numel()}"
    )


@_loader.register_fake("deepseek_ext::unscale_and_check_")
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

    On the CPU ``inv_scale`` is read on the host (no device there) and is the
    BLAS's alpha, so a scale that is not a power of two may round differently
    from the CUDA kernels, which multiply the float32 sums.
    """
    return _ops().matmul_unscale_check.default(a, b, inv_scale, found_inf, out_dtype=out_dtype)


@_loader.register_fake("deepseek_ext::matmul_unscale_check")
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
    _ops().update_scale_.default(
        scale, growth_tracker, hysteresis_tracker, skip_counts, found_inf,
        float(growth_factor), float(backoff_factor), int(growth_interval), int(hysteresis),
        float(min_scale), float(max_scale),
    )


@_loader.register_fake("deepseek_ext::update_scale_")
def _update_scale_fake(scale, growth_tracker, hysteresis_tracker, skip_counts, found_inf, growth_factor,
                       backoff_factor, growth_interval, hysteresis, min_scale, max_scale):
    for t, name, dtype, n in ((scale, "scale", torch.float32, 1), (growth_tracker, "growth_tracker", torch.int32, 1),
                              (hysteresis_tracker, "hysteresis_tracker", torch.int32, 1),
                              (skip_counts, "skip_counts", torch.int64, 2), (found_inf, "found_inf", torch.float32, 1)):
        torch._check(t.dtype == dtype, lambda: f"{name} must be a {dtype} tensor, got {t.dtype}")
        torch._check(t.numel() == n, lambda: f"{name} must have {n} element(s), got {t.numel()}")
    return None
# ---- 8-bit gradient quantisation (blockwise int8) ----
#
# The flattened tensor is cut into blocks of ``block_size`` elements (a positive
# multiple of 32 up to 4096; the last block may be partial). Each block gets a
# float32 scale = absmax / 127 and int8 values q = round(x / scale). A block of
# zeros has scale 0; a block holding inf or NaN has scale NaN (and q 0), so
# dequantising it yields NaN. See csrc/include/deepseek_ext/detail/int8_quant.h.

_MAX_BLOCK_SIZE = 4096


def _num_blocks(n, block_size: int):
    return (n + block_size - 1) // block_size


def quantize_int8(
    x: torch.Tensor, block_size: int = 256, stochastic: bool = False, seed: int = 0, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise int8 quantisation of ``x`` (flattened).

    Args:
        x: float32, float16 or bfloat16 tensor, any shape and strides.
        block_size: elements per block, a positive multiple of 32 up to 4096.
        stochastic: round stochastically instead of to nearest-even: q is
            floor(v) or floor(v) + 1 for v = x * RN(1 / scale), with
            E[q] = v (to 2^-23 of a step), so E[q * scale] = x to float32
            rounding. The random words come from Philox4x32-10 keyed by
            ``seed`` at counter ``offset + i`` for element ``i``, so CPU and CUDA
            give bit-identical results; use a fresh ``offset`` (or ``seed``) per
            call to draw fresh numbers.
        seed: 64-bit Philox key.
        offset: index of the first element in the random stream (>= 0).

    Returns:
        ``(q, scales)``: int8 ``q`` with ``x``'s shape, float32 ``scales`` of
        ``ceil(x.numel() / block_size)`` elements.
    """
    return _ops().quantize_int8.default(x, block_size, stochastic, seed, offset)


def quantize_int8_ef_(
    x: torch.Tensor,
    residual: torch.Tensor,
    block_size: int = 256,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantisation with error feedback, in one pass.

    Quantises ``y = x + residual`` (in float32) like :func:`quantize_int8` and
    writes the part that was not sent, ``y - q * scale`` (one rounding), back
    into ``residual``; where ``q`` is 0 that is ``y`` itself, bit for bit (a
    ``-0.0`` stays ``-0.0``). A bfloat16 ``residual`` stores that value rounded to
    bfloat16. A block holding inf/NaN leaves its residual unchanged (its scale
    is NaN, so the bad gradient is still visible downstream).

    Args:
        x: float32, float16 or bfloat16 tensor.
        residual: float32 or bfloat16 tensor with ``x.numel()`` elements on
            ``x``'s device; updated in place.
        block_size, stochastic, seed, offset: as in :func:`quantize_int8`.

    Returns:
        ``(q, scales)`` of ``x + residual``.
    """
    return _ops().quantize_int8_ef_.default(
        x, residual, block_size, stochastic, seed, offset
    )


def dequantize_int8(
    q: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    numel: int | None = None,
) -> torch.Tensor:
    """``q * scale`` per block, in ``dtype``, with ``q``'s shape.

    Args:
        q: int8 tensor of ``numel`` elements (from :func:`quantize_int8`).
        scales: float32 1-D tensor of ``ceil(numel / block_size)`` elements.
        block_size: the block size ``q`` was made with.
        dtype: float32, float16 or bfloat16.
        numel: number of elements (default ``q.numel()``); must equal ``q.numel()``.
    """
    if numel is None:
        numel = q.numel()
    return _ops().dequantize_int8.default(q, scales, block_size, dtype, numel)


def dequantize_reduce_int8(
    q: torch.Tensor,
    scales: torch.Tensor,
    block_size: int,
    multiplier: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``multiplier * sum_w q[w] * scales[w]`` in one pass, accumulated in float32.

    The reduce step of a compressed reduce-scatter: ``q`` ``[W, n]`` holds W
    ranks' quantised copies of one shard, ``scales`` ``[W, ceil(n / block_size)]``
    their scales. Ranks are summed in order 0..W-1, each term with one fused
    multiply-add, then multiplied by ``multiplier`` (e.g. ``1 / W`` for a mean).

    Returns:
        ``[n]`` tensor of ``dtype`` (float32, float16 or bfloat16).
    """
    return _ops().dequantize_reduce_int8.default(
        q, scales, block_size, multiplier, dtype
    )


def _check_block_size(block_size: int) -> None:
    torch._check(
        block_size > 0 and block_size % 32 == 0 and block_size <= _MAX_BLOCK_SIZE,
        lambda: f"block_size must be a positive multiple of 32 up to {_MAX_BLOCK_SIZE}, got {block_size}",
    )


def _check_quantize(x: torch.Tensor, block_size: int, offset: int) -> None:
    torch._check(
        x.dtype in _FLOAT_DTYPES, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}"
    )
    _check_block_size(block_size)
    torch._check(offset >= 0, lambda: f"offset must be >= 0, got {offset}")


@_loader.register_fake("deepseek_ext::quantize_int8")
def _quantize_int8_fake(x, block_size=256, stochastic=False, seed=0, offset=0):
    _check_quantize(x, block_size, offset)
    q = x.new_empty(x.shape, dtype=torch.int8)
    scales = x.new_empty((_num_blocks(x.numel(), block_size),), dtype=torch.float32)
    return q, scales


@_loader.register_fake("deepseek_ext::quantize_int8_ef_")
def _quantize_int8_ef_fake(x, residual, block_size=256, stochastic=False, seed=0, offset=0):
    _check_quantize(x, block_size, offset)
    torch._check(
        residual.device == x.device,
        lambda: f"residual must be on the same device as x ({x.device}), got {residual.device}",
    )
    torch._check(
        residual.dtype in (torch.float32, torch.bfloat16),
        lambda: f"residual must be float32 or bfloat16, got {residual.dtype}",
    )
    torch._check(
        residual.numel() == x.numel(),
        lambda: f"residual must have as many elements as x ({x.numel()}), got {residual.numel()}",
    )
    return _quantize_int8_fake(x, block_size, stochastic, seed, offset)


def _check_q_scales(q: torch.Tensor, scales: torch.Tensor, block_size: int, dtype) -> None:
    torch._check(
        scales.device == q.device,
        lambda: f"scales must be on the same device as q ({q.device}), got {scales.device}",
    )
    torch._check(q.dtype == torch.int8, lambda: f"q must be an int8 tensor, got {q.dtype}")
    torch._check(
        scales.dtype == torch.float32, lambda: f"scales must be a float32 tensor, got {scales.dtype}"
    )
    _check_block_size(block_size)
    torch._check(
        dtype in _FLOAT_DTYPES, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}"
    )


@_loader.register_fake("deepseek_ext::dequantize_int8")
def _dequantize_int8_fake(q, scales, block_size, dtype, numel):
    _check_q_scales(q, scales, block_size, dtype)
    torch._check(numel >= 0, lambda: f"numel must be >= 0, got {numel}")
    torch._check(
        q.numel() == numel, lambda: f"q must have numel = {numel} elements, got {q.numel()}"
    )
    nblocks = _num_blocks(numel, block_size)
    torch._check(
        scales.dim() == 1 and scales.numel() == nblocks,
        lambda: f"scales must be a 1-D tensor of ceil(numel / block_size) = {nblocks} elements, "
        f"got shape {tuple(scales.shape)}",
    )
    return q.new_empty(q.shape, dtype=dtype)


@_loader.register_fake("deepseek_ext::dequantize_reduce_int8")
def _dequantize_reduce_int8_fake(q, scales, block_size, multiplier, dtype):
    _check_q_scales(q, scales, block_size, dtype)
    torch._check(q.dim() == 2, lambda: f"q must be a 2-D tensor [world_size, n], got shape {tuple(q.shape)}")
    nblocks = _num_blocks(q.shape[1], block_size)
    torch._check(
        scales.dim() == 2 and scales.shape[0] == q.shape[0] and scales.shape[1] == nblocks,
        lambda: f"scales must have shape [{q.shape[0]}, {nblocks}] (q's world_size, "
        f"ceil(n / block_size)), got {tuple(scales.shape)}",
    )
    return q.new_empty((q.shape[1],), dtype=dtype)


# ---- gated sparse FFN (block-sparse: only the selected blocks are computed) ----
#
# The FFN's d_ff hidden units are cut into n_blocks blocks of block_size units.
# w1 [n_blocks * m * block_size, d_model] (m = 2 for "swiglu": per block,
# block_size gate rows then block_size up rows; m = 1 for "gelu", "gelu_tanh"
# and "silu"),
# b1 [n_blocks * m * block_size] (optional), w2 [n_blocks * block_size, d_model]
# (hidden-major: the transpose of nn.Linear's weight). Token t's j-th selected
# block is the pair p = t * k + j. See csrc/include/deepseek_ext/ops.h.

_SPARSE_FFN_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "swiglu")
_SPARSE_FFN_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def sparse_ffn_route(
    scores: torch.Tensor, bias: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k blocks per token and the (token, block) pairs grouped by block, on the device.

    Args:
        scores: ``[T, n_blocks]`` gate scores (float32/float64/float16/bfloat16).
        bias: float32 ``[n_blocks]`` balancing bias; it only steers the choice
            (top-k of ``scores + bias``), never the gate weights.
        k: blocks per token, ``1 <= k <= n_blocks``.

    Returns:
        ``(topk_idx, order, offsets)``: int64 ``[T, k]`` chosen blocks
        (descending ``scores + bias``, ties to the lower index); int64
        ``[T * k]`` pair indices ``p = t * k + j`` sorted by block (stable);
        int64 ``[n_blocks + 1]`` offsets: block ``b`` owns
        ``order[offsets[b]:offsets[b + 1]]``. Nothing is read by the host.
    """
    return _ops().sparse_ffn_route.default(scores, bias, int(k))


@_loader.register_fake("deepseek_ext::sparse_ffn_route")
def _sparse_ffn_route_fake(scores, bias, k):
    torch._check(scores.dim() == 2, lambda: f"scores must be a 2-D tensor [tokens, n_blocks], got shape {tuple(scores.shape)}")
    torch._check(scores.dtype in _SPARSE_FFN_DTYPES, lambda: f"scores must be float32, float64, float16 or bfloat16, got {scores.dtype}")
    torch._check(bias.dtype == torch.float32, lambda: f"bias must be a float32 tensor, got {bias.dtype}")
    torch._check(bias.device == scores.device, lambda: f"bias must be on the same device as scores ({scores.device}), got {bias.device}")
    nb = scores.shape[1]
    torch._check(bias.dim() == 1 and bias.shape[0] == nb, lambda: f"bias must be a 1-D tensor of n_blocks = {nb} elements (scores.size(1)), got shape {tuple(bias.shape)}")
    torch._check(1 <= k <= nb, lambda: f"k must be in [1, n_blocks = {nb}], got {k}")
    t = scores.shape[0]
    return (scores.new_empty((t, k), dtype=torch.int64), scores.new_empty((t * k,), dtype=torch.int64),
            scores.new_empty((nb + 1,), dtype=torch.int64))


def sparse_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    gate: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    block_size: int,
    activation: str = "gelu",
) -> torch.Tensor:
    """Block-sparse FFN over each token's selected blocks only, differentiable.

    ``out[t] = sum_j gate[t, j] * act(x[t] @ w1_b.T + b1_b) @ w2_b`` with
    ``b = topk_idx[t, j]``; the tokens of each block are gathered and
    multiplied by that block's weights only (grouped GEMMs), and the gradients
    of x, w1, b1, w2 and gate have the same sparsity (unselected blocks get
    zero weight gradients).

    Args:
        x: ``[T, d_model]``.  w1, b1, w2: the layout above, x's dtype and device.
        gate: ``[T, k]`` weights of the selected blocks (x's dtype).
        order, offsets: from :func:`sparse_ffn_route`.
        block_size: hidden units per block.
        activation: ``"gelu"`` (exact, erf), ``"gelu_tanh"`` (the tanh
            approximation, ``F.gelu(approximate="tanh")``), ``"silu"`` or
            ``"swiglu"`` (``silu(gate) * up``).

    Returns:
        ``[T, d_model]``.
    """
    out, _ = _ops().sparse_ffn.default(x, w1, b1, w2, gate, order, offsets, int(block_size), activation)
    return out


def sparse_ffn_backward(grad_out, x, w1, w2, gate, hidden, order, offsets, block_size: int, activation: str = "gelu"):
    """``(grad_x, grad_w1, grad_b1, grad_w2, grad_gate)`` of :func:`sparse_ffn`;
    ``hidden`` is the second output of ``torch.ops.deepseek_ext.sparse_ffn``."""
    return _ops().sparse_ffn_backward.default(
        grad_out, x, w1, w2, gate, hidden, order, offsets, int(block_size), activation)


def sparse_ffn_gather(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """``x``'s rows in block order: ``out[i] = x[order[i] // k]``, ``[T * k, d_model]``.

    The first step of :func:`sparse_ffn`'s kernels (one 16-byte-vectorised pass
    on CUDA), as an op so that it can be measured and tested on its own. Not
    differentiable.

    Args:
        x: ``[T, d_model]`` float32/float64/float16/bfloat16.
        order: int64 ``[T * k]`` from :func:`sparse_ffn_route`.
        k: blocks per token.
    """
    return _ops().sparse_ffn_gather.default(x, order, int(k))


def sparse_ffn_combine(y: torch.Tensor, order: torch.Tensor, k: int,
                       gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-ordered rows back to tokens: ``out[t] = sum_j gate[t, j] * y[i]`` over
    the rows ``i`` with ``order[i] == t * k + j`` (gate 1 when ``None``).

    The last step of :func:`sparse_ffn`'s kernels: one pass, float32
    accumulation (float64 for float64), ``j`` ascending, no atomics, so the
    result is deterministic. Not differentiable.

    Args:
        y: ``[T * k, d_model]`` rows in block order.
        order: int64 ``[T * k]``, a permutation (from :func:`sparse_ffn_route`;
            checked on the CPU, trusted on CUDA).
        k: blocks per token.
        gate: optional ``[T, k]`` weights, ``y``'s dtype.

    Returns:
        ``[T, d_model]``.
    """
    return _ops().sparse_ffn_combine.default(y, order, int(k), gate)


@_loader.register_fake("deepseek_ext::sparse_ffn_gather")
def _sparse_ffn_gather_fake(x, order, k):
    torch._check(x.dtype in _SPARSE_FFN_DTYPES, lambda: f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"x must be a 2-D tensor [tokens, d_model], got shape {tuple(x.shape)}")
    torch._check(order.device == x.device, lambda: f"order must be on the same device as x ({x.device}), got {order.device}")
    torch._check(order.dtype == torch.int64 and order.dim() == 1,
                 lambda: f"order must be a 1-D int64 tensor, got {order.dtype} of shape {tuple(order.shape)}")
    torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")
    return x.new_empty((order.shape[0], x.shape[1]))


@_loader.register_fake("deepseek_ext::sparse_ffn_combine")
def _sparse_ffn_combine_fake(y, order, k, gate=None):
    torch._check(y.dtype in _SPARSE_FFN_DTYPES, lambda: f"y must be float32, float64, float16 or bfloat16, got {y.dtype}")
    torch._check(y.dim() == 2, lambda: f"y must be a 2-D tensor [tokens * k, d_model], got shape {tuple(y.shape)}")
    torch._check(order.device == y.device, lambda: f"order must be on the same device as y ({y.device}), got {order.device}")
    torch._check(order.dtype == torch.int64 and order.dim() == 1 and order.shape[0] == y.shape[0],
                 lambda: f"order must be a 1-D int64 tensor of y.size(0) = {y.shape[0]} elements, got "
                 f"{order.dtype} of shape {tuple(order.shape)}")
    torch._check(k >= 1 and y.shape[0] % k == 0, lambda: f"k must be >= 1 and divide y.size(0) = {y.shape[0]}, got {k}")
    t = y.shape[0] // k
    if gate is not None:
        torch._check(gate.device == y.device, lambda: f"gate must be on the same device as y ({y.device}), got {gate.device}")
        torch._check(gate.dtype == y.dtype, lambda: f"gate must have y's dtype ({y.dtype}), got {gate.dtype}")
        torch._check(gate.dim() == 2 and gate.shape[0] == t and gate.shape[1] == k,
                     lambda: f"gate must be [tokens = {t}, k = {k}], got shape {tuple(gate.shape)}")
    return y.new_empty((t, y.shape[1]))


def _check_sparse_ffn(x, w1, b1, w2, gate, order, offsets, block_size, activation):
    torch._check(activation in _SPARSE_FFN_ACTIVATIONS, lambda: f'activation must be "gelu", "gelu_tanh", "silu" or "swiglu", got "{activation}"')
    torch._check(x.dtype in _SPARSE_FFN_DTYPES, lambda: f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"x must be a 2-D tensor [tokens, d_model], got shape {tuple(x.shape)}")
    for t, name in ((w1, "w1"), (w2, "w2"), (gate, "gate")) + (((b1, "b1"),) if b1 is not None else ()):
        torch._check(t.device == x.device, lambda: f"{name} must be on the same device as x ({x.device}), got {t.device}")
        torch._check(t.dtype == x.dtype, lambda: f"{name} must have x's dtype ({x.dtype}), got {t.dtype}")
    torch._check(block_size > 0, lambda: f"block_size must be positive, got {block_size}")
    d = x.shape[1]
    m = 2 if activation == "swiglu" else 1
    torch._check(w2.dim() == 2 and w2.shape[1] == d and w2.shape[0] > 0 and w2.shape[0] % block_size == 0,
                 lambda: f"w2 must be [n_blocks * block_size, d_model] with block_size = {block_size} and d_model = {d}, got shape {tuple(w2.shape)}")
    nb = w2.shape[0] // block_size
    torch._check(w1.dim() == 2 and w1.shape[0] == nb * m * block_size and w1.shape[1] == d,
                 lambda: f"w1 must be [{nb * m * block_size}, {d}] (n_blocks * {m} * block_size, d_model), got shape {tuple(w1.shape)}")
    if b1 is not None:
        torch._check(b1.dim() == 1 and b1.shape[0] == w1.shape[0], lambda: f"b1 must be a 1-D tensor of {w1.shape[0]} elements (w1.size(0)), got shape {tuple(b1.shape)}")
    torch._check(gate.dim() == 2 and gate.shape[0] == x.shape[0] and 1 <= gate.shape[1] <= nb,
                 lambda: f"gate must be [tokens = {x.shape[0]}, k] with 1 <= k <= n_blocks = {nb}, got shape {tuple(gate.shape)}")
    for t, name in ((order, "order"), (offsets, "offsets")):
        torch._check(t.device == x.device, lambda: f"{name} must be on the same device as x ({x.device}), got {t.device}")
    torch._check(order.dtype == torch.int64 and offsets.dtype == torch.int64,
                 lambda: f"order and offsets must be int64 tensors, got {order.dtype} and {offsets.dtype}")
    torch._check(order.dim() == 1 and order.numel() == gate.numel(), lambda: f"order must be a 1-D tensor of tokens * k = {gate.numel()} elements, got shape {tuple(order.shape)}")
    torch._check(offsets.dim() == 1 and offsets.numel() == nb + 1, lambda: f"offsets must be a 1-D tensor of n_blocks + 1 = {nb + 1} elements, got shape {tuple(offsets.shape)}")
    return m


@_loader.register_fake("deepseek_ext::sparse_ffn")
def _sparse_ffn_fake(x, w1, b1, w2, gate, order, offsets, block_size, activation):
    m = _check_sparse_ffn(x, w1, b1, w2, gate, order, offsets, block_size, activation)
    return x.new_empty(x.shape), x.new_empty((gate.numel(), m * block_size))


@_loader.register_fake("deepseek_ext::sparse_ffn_backward")
def _sparse_ffn_backward_fake(grad_out, x, w1, w2, gate, hidden, order, offsets, block_size, activation):
    m = _check_sparse_ffn(x, w1, None, w2, gate, order, offsets, block_size, activation)
    torch._check(grad_out.shape == x.shape, lambda: f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    torch._check(hidden.dim() == 2 and hidden.shape[0] == gate.numel() and hidden.shape[1] == m * block_size,
                 lambda: f"hidden must be [tokens * k, {m * block_size}] (sparse_ffn's second output), got shape {tuple(hidden.shape)}")
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty((w1.shape[0],)), w2.new_empty(w2.shape),
            gate.new_empty(gate.shape))
# ---- Shared-attention layers ----
# shared_attention is a composition of ATen ops registered for
# CompositeImplicitAutograd in C++ (csrc/ops/shared_attention/): autograd and meta
# come from those ops, so it needs no fake kernel here.


def shared_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: Optional[torch.Tensor],
    w_out: torch.Tensor,
    b_out: Optional[torch.Tensor],
    n_heads: int,
    n_kv_heads: Optional[int] = None,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Multi-head attention with a fused QKV projection.

    ``x`` [B, T, d_model] -> ``linear(x, w_qkv, b_qkv)`` split into ``n_heads``
    query heads and ``n_kv_heads`` (default ``n_heads``) key and value heads,
    head_dim = d_model / n_heads -> ``scaled_dot_product_attention`` ->
    ``linear(., w_out, b_out)`` -> [B, T, d_model].

    Args:
        w_qkv: [(n_heads + 2 n_kv_heads) head_dim, d_model]; b_qkv its bias or None.
        w_out: [d_model, d_model]; b_out [d_model] or None.
        causal: each position attends to itself and earlier positions only.
        key_padding_mask: bool [B, T], True marks padding keys. A query left
            with no key to attend to gets zeros from the attention.
        dropout_p: attention-probability dropout, applied only when ``training``.
    """
    return _ops().shared_attention.default(
        x, w_qkv, b_qkv, w_out, b_out, n_heads, n_heads if n_kv_heads is None else n_kv_heads,
        causal, key_padding_mask, dropout_p, training,
    )
