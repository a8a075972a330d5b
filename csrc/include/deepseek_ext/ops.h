#pragma once
// Typed C++ entry points of the deepseek_ext operators. Each one calls through
// the PyTorch dispatcher, so it reaches the CPU, CUDA or Meta kernel of its
// inputs exactly as `torch.ops.deepseek_ext.<op>` does from Python.

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <cstdint>
#include <tuple>

namespace deepseek_ext {

// Multiplies every element of every tensor in `grads` in place by `inv_scale`
// and sets `found_inf` to 1.0 if any element was inf or NaN before the
// multiplication (it is never cleared). `grads` may mix float32, float16 and
// bfloat16 tensors; all tensors live on one device. When `inv_scale` holds
// exactly 1.0 the gradients are only read, never written.
//
// Drop-in for `at::_amp_foreach_non_finite_check_and_unscale_`.
//   grads:     tensors to unscale in place (float32 / float16 / bfloat16).
//   found_inf: 1-element float32 tensor on the grads' device.
//   inv_scale: 1-element float32 tensor on the grads' device.
void unscale_and_check_(at::TensorList grads, const at::Tensor& found_inf,
                        const at::Tensor& inv_scale);

// out = (a @ b) * inv_scale, accumulated in float32 and converted to
// out_dtype (float32 or a's dtype, the default); sets found_inf to 1.0 if any
// converted output element is inf or NaN. a, b: float16 or bfloat16 (float32
// accepted too), 2-D, any strides (transposed views are not copied on CUDA).
// inv_scale, found_inf: 1-element float32 tensors on a's device.
at::Tensor matmul_unscale_check(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                                const at::Tensor& found_inf,
                                std::optional<at::ScalarType> out_dtype = std::nullopt);

// One optimizer step of the dynamic loss scaler, on the device (see
// detail/loss_scale.h for the rule): scale float32[1], growth_tracker int32[1],
// hysteresis_tracker int32[1], skip_counts int64[2] (consecutive, total) are
// updated in place from found_inf float32[1].
void update_scale_(const at::Tensor& scale, const at::Tensor& growth_tracker,
                   const at::Tensor& hysteresis_tracker, const at::Tensor& skip_counts,
                   const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                   int64_t growth_interval, int64_t hysteresis, double min_scale, double max_scale);
// ---- 8-bit gradient quantisation (int8, blockwise) ----
// The flattened tensor is cut into blocks of `block_size` elements (a positive
// multiple of 32 up to 4096; the last block may be partial). Each block has a
// float32 scale = absmax / 127 and int8 values q = round(x / scale). A block of
// zeros has scale 0; a block holding inf or NaN has scale NaN (and q 0), so
// that dequantising it gives NaN. Rounding is to nearest (ties to even), or,
// with `stochastic`, stochastic rounding of x * RN(1 / scale), unbiased to
// float32 rounding, driven by Philox4x32-10 keyed
// by `seed` at counter `offset + element index`: the CPU and CUDA kernels give
// bit-identical q and scales. The math is in deepseek_ext/detail/int8_quant.h.

// Returns (q, scales): q int8 with x's shape, scales float32 [ceil(numel / block_size)].
//   x: float32 / float16 / bfloat16, any shape and strides.
std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x, int64_t block_size = 256,
                                                 bool stochastic = false, int64_t seed = 0,
                                                 int64_t offset = 0);

// Error feedback: quantises y = x + residual and stores residual = y - q * scale
// (one rounding; in residual's dtype, float32 or bfloat16) in the same pass.
// Where q is 0 the new residual is y bit for bit (-0 included). A non-finite
// block leaves its residual unchanged. Returns (q, scales) of y.
std::tuple<at::Tensor, at::Tensor> quantize_int8_ef_(const at::Tensor& x,
                                                     const at::Tensor& residual,
                                                     int64_t block_size = 256,
                                                     bool stochastic = false, int64_t seed = 0,
                                                     int64_t offset = 0);

// q * scale in `dtype`, with q's shape; q must have `numel` elements and scales
// ceil(numel / block_size).
at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                           at::ScalarType dtype, int64_t numel);

// multiplier * sum_w q[w] * scales[w] over the W rows of q [W, n] (scales
// [W, ceil(n / block_size)]), accumulated in float32 in rank order, returned
// as [n] in `dtype`: the reduce step of a compressed reduce-scatter.
at::Tensor dequantize_reduce_int8(const at::Tensor& q, const at::Tensor& scales,
                                  int64_t block_size, double multiplier, at::ScalarType dtype);

// ---- gated sparse FFN (block-sparse, only the selected blocks are computed) ----
// The FFN's d_ff hidden units are cut into n_blocks blocks of block_size units.
//   w1 [n_blocks * m * block_size, d_model]: the first projection, m = 2 for
//      "swiglu" (per block: block_size gate rows, then block_size up rows),
//      m = 1 for "gelu" (exact, erf), "gelu_tanh" (tanh approximation) and "silu";
//   b1 [n_blocks * m * block_size] (optional);
//   w2 [n_blocks * block_size, d_model]: the second projection, hidden-major
//      (the transpose of nn.Linear's weight), so that each block is a row range.
// Token t's j-th selected block forms the pair p = t * k + j.

// Top-k blocks of scores + bias per token (the bias only steers the choice;
// ties keep the lower block index) and the pairs grouped by block, on the
// device: returns (topk_idx int64 [T, k], order int64 [T * k] = the pairs
// sorted by block (stable), offsets int64 [n_blocks + 1]: block b owns
// order[offsets[b] : offsets[b + 1]]).
//   scores: [T, n_blocks] float; bias: float32 [n_blocks]; 1 <= k <= n_blocks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_ffn_route(const at::Tensor& scores,
                                                                const at::Tensor& bias, int64_t k);

// out[t] = sum_j gate[t, j] * act(x[t] @ w1_b^T + b1_b) @ w2_b, b = topk_idx[t, j],
// computing only the selected blocks (grouped GEMMs over `order` / `offsets`
// from sparse_ffn_route). Returns (out [T, d_model], hidden [T * k, m * block_size]:
// the pre-activations in `order` order, needed by the backward).
// Differentiable in x, w1, b1, w2 and gate (autograd kernel; backward below).
//   x [T, d_model]; w1, b1, w2, gate [T, k]: x's dtype and device.
std::tuple<at::Tensor, at::Tensor> sparse_ffn(const at::Tensor& x, const at::Tensor& w1,
                                              const std::optional<at::Tensor>& b1,
                                              const at::Tensor& w2, const at::Tensor& gate,
                                              const at::Tensor& order, const at::Tensor& offsets,
                                              int64_t block_size, c10::string_view activation);

// The row movers of sparse_ffn (not differentiable). A pair p = t * k + j is
// token t's j-th selected block; `order` (from sparse_ffn_route) lists the pairs
// in block order. sparse_ffn_gather: out[i] = x[order[i] / k] -> [T * k, d_model]
// (x [T, d_model]). sparse_ffn_combine: out[t] = sum_j gate[t, j] * y[i] over
// the rows i with order[i] = t * k + j (gate 1 when absent; j ascending,
// accumulated in float32) -> [y.size(0) / k, d_model]; `order` must be a
// permutation of 0 .. y.size(0) - 1 (the CPU checks it, CUDA trusts it).
at::Tensor sparse_ffn_gather(const at::Tensor& x, const at::Tensor& order, int64_t k);
at::Tensor sparse_ffn_combine(const at::Tensor& y, const at::Tensor& order, int64_t k,
                              const std::optional<at::Tensor>& gate = std::nullopt);

// Returns (grad_x, grad_w1, grad_b1, grad_w2, grad_gate) of sparse_ffn for
// grad_out [T, d_model]; the weight gradients of unselected blocks are zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_ffn_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& gate, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, int64_t block_size, c10::string_view activation);
// ---- Shared-attention layers ----
// Multi-head attention with a fused QKV projection: x [B, T, d_model] ->
// linear(x, w_qkv, b_qkv), split into n_heads query heads and n_kv_heads key and
// value heads (grouped-query attention when n_kv_heads < n_heads; head_dim =
// d_model / n_heads) -> scaled_dot_product_attention (causal and/or
// key_padding_mask bool [B, T], True = padding; dropout_p applied only when
// `training`) -> linear(., w_out, b_out). Returns [B, T, d_model].
//   w_qkv [(n_heads + 2 n_kv_heads) head_dim, d_model], b_qkv its rows' bias;
//   w_out [d_model, d_model], b_out [d_model].
// A composition of ATen ops: differentiable, on every device ATen supports.
at::Tensor shared_attention(const at::Tensor& x, const at::Tensor& w_qkv,
                            const std::optional<at::Tensor>& b_qkv, const at::Tensor& w_out,
                            const std::optional<at::Tensor>& b_out, int64_t n_heads,
                            int64_t n_kv_heads, bool causal = false,
                            const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                            double dropout_p = 0.0, bool training = false);

}  // namespace deepseek_ext
