#pragma once
// CPU building blocks of the gated sparse FFN that move rows between token
// order and block order, shared by the CPU kernels of sparse_ffn /
// sparse_ffn_backward and by the CPU kernels of the sparse_ffn_gather and
// sparse_ffn_combine ops (the CPU twins of kernels/sparse_ffn_permute.cu).
// A pair p = t * k + j is token t's j-th selected block; `order` lists the
// pairs in block order, so row i of a block-ordered tensor belongs to pair
// order[i], and pos[p] (the inverse permutation) is the row of pair p.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace deepseek_ext {
namespace ops {

// pos[order[i]] = i for the P = order.numel() pairs; checks that `order` is a
// permutation of 0 .. P - 1 (named "order" in the message). int64 [P].
at::Tensor inverse_permutation_cpu(const at::Tensor& order);

// dst[i] = x[pairs[i] / k] for i < n: x [T, D] contiguous, dst [>= n, D]
// contiguous of x's dtype. Parallel over rows when n is large.
void gather_rows_cpu(const at::Tensor& x, const int64_t* pairs, int64_t n, int64_t k,
                     at::Tensor& dst);

// out[t] = sum_j gate[t, j] * y[pos[t * k + j]] (gate 1 when absent), j in
// ascending order, accumulated in float32 (float64 for double); y [P, D] and
// out [P / k, D] contiguous, gate [P / k, k] contiguous. No row is written
// twice: parallel over tokens, deterministic for any thread count.
void combine_rows_cpu(const at::Tensor& y, const at::Tensor& pos, int64_t k,
                      const std::optional<at::Tensor>& gate, at::Tensor& out);

// A buffer of `rows` x `cols` elements of `dtype` that the calling thread
// keeps between calls (one per `slot`), grown only when a call needs more:
// the per-call scratch of the CPU kernels, so that a training step does not
// allocate and free blocks of varying size (which fragments glibc's heap).
// Valid until the same thread asks for the same slot again.
// kRows: [T * k, d_model] block-ordered rows; kTiles: per-thread row tiles of
// d_model columns; kHiddenTiles: per-thread tiles of the hidden width.
enum class WorkspaceSlot { kRows, kTiles, kHiddenTiles };
at::Tensor cpu_workspace(WorkspaceSlot slot, int64_t rows, int64_t cols, at::ScalarType dtype);

}  // namespace ops
}  // namespace deepseek_ext
