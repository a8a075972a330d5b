#pragma once
// Internal helpers shared by the CPU and CUDA kernels of the gated sparse FFN
// ops (sparse_ffn_route, sparse_ffn, sparse_ffn_backward).
//
// Layout (see deepseek_ext/ops.h): the FFN hidden units are cut into n_blocks
// blocks of block_size units. w1 [n_blocks * m * block_size, d_model] holds the
// first projection (m = 2 for swiglu: per block, block_size gate rows then
// block_size up rows; m = 1 otherwise), w2 [n_blocks * block_size, d_model]
// the second one, stored hidden-major so that every block is a row range of
// both. A "pair" p = t * k + j is token t's j-th selected block; `order` lists
// the pairs grouped by block and offsets[b] .. offsets[b + 1] is block b's range.

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace deepseek_ext {
namespace ops {

// kGelu: GELU with erf; kGeluTanh: GELU's tanh approximation (F.gelu(x,
// approximate="tanh"), Hugging Face's "gelu_new"); kSwiglu: silu(gate) * up.
enum class Activation { kGelu, kGeluTanh, kSilu, kSwiglu };

// "gelu" (exact, erf), "gelu_tanh", "silu" or "swiglu"; anything else throws naming `activation`.
Activation parse_activation(std::string_view activation);

// Rows of w1 per hidden unit: 2 for swiglu, 1 otherwise.
inline int64_t w1_rows_per_unit(Activation act) { return act == Activation::kSwiglu ? 2 : 1; }

// act(a) for a [n, m * block_size] -> [n, block_size] (ATen ops: any device).
at::Tensor activation_forward(const at::Tensor& a, Activation act, int64_t block_size);
// d loss / d a from dh = d loss / d act(a) -> [n, m * block_size].
at::Tensor activation_backward(const at::Tensor& dh, const at::Tensor& a, Activation act,
                               int64_t block_size);

// scores [T, n_blocks] float32/float16/bfloat16/float64, bias float32 [n_blocks]
// on scores' device, 1 <= k <= n_blocks.
void check_route_inputs(const at::Tensor& scores, const at::Tensor& bias, int64_t k,
                        c10::DeviceType device_type);

// Checks the forward's arguments; returns the number of blocks.
int64_t check_sparse_ffn_inputs(const at::Tensor& x, const at::Tensor& w1,
                                const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                const at::Tensor& gate, const at::Tensor& order,
                                const at::Tensor& offsets, int64_t block_size,
                                Activation act, c10::DeviceType device_type);

// As check_sparse_ffn_inputs, plus grad_out [T, d_model] and hidden [T * k, m * block_size].
int64_t check_sparse_ffn_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& w1, const at::Tensor& w2,
                                         const at::Tensor& gate, const at::Tensor& hidden,
                                         const at::Tensor& order, const at::Tensor& offsets,
                                         int64_t block_size, Activation act,
                                         c10::DeviceType device_type);

// sparse_ffn_gather: x [T, d_model] floating, order int64 [P] on x's device, k >= 1.
void check_gather_inputs(const at::Tensor& x, const at::Tensor& order, int64_t k,
                         c10::DeviceType device_type);
// sparse_ffn_combine: y [P, d_model] floating, order int64 [P] on y's device,
// k >= 1 dividing P, gate (optional) [P / k, k] of y's dtype and device.
void check_combine_inputs(const at::Tensor& y, const at::Tensor& order, int64_t k,
                          const std::optional<at::Tensor>& gate, c10::DeviceType device_type);

// The device-agnostic grouped-GEMM route (at::_grouped_mm with the device
// offsets; CUTLASS grouped GEMM for bfloat16 on sm90): used by the CUDA kernels.
std::tuple<at::Tensor, at::Tensor> sparse_ffn_grouped(const at::Tensor& x, const at::Tensor& w1,
                                                      const std::optional<at::Tensor>& b1,
                                                      const at::Tensor& w2, const at::Tensor& gate,
                                                      const at::Tensor& order,
                                                      const at::Tensor& offsets,
                                                      int64_t block_size, Activation act);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_ffn_backward_grouped(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& gate, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, int64_t block_size, Activation act);

}  // namespace ops
}  // namespace deepseek_ext
