// Gated sparse FFN on CUDA.
//
// sparse_ffn_route: one thread per token keeps its top-k blocks of
// scores + bias in a k-slot insertion list (descending; ties keep the lower
// block index, as on the CPU); the pairs are then grouped by block with a
// stable device sort of the block ids and the offsets come from a device-side
// count + cumulative sum. Nothing is read by the host.
//
// sparse_ffn / sparse_ffn_backward: the grouped-GEMM route of sparse_ffn_grouped.cpp:
// at::_grouped_mm with the block offsets as a device tensor (PyTorch's CUTLASS
// grouped GEMM on sm90 for bfloat16; PyTorch's fallback elsewhere), gathers and
// the per-token sum through the inverse permutation (no atomics).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "deepseek_ext/detail/topk.h"

#include "sparse_ffn/sparse_ffn.h"

namespace deepseek_ext {
namespace ops {
namespace {

constexpr int kThreads = 128;
// Slots of a token's top-k list kept in registers / local memory.
constexpr int64_t kMaxK = 256;

template <typename scalar_t>
__global__ void topk_rows_kernel(const scalar_t* __restrict__ scores,
                                 const float* __restrict__ bias, int64_t T, int64_t nb, int k,
                                 int64_t* __restrict__ idx) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  float best[kMaxK];
  int arg[kMaxK];
  const scalar_t* s = scores + t * nb;
  int64_t filled = 0;
  for (int b = 0; b < nb; ++b) {
    detail::topk_offer(static_cast<float>(s[b]) + bias[b], b, best, arg, k, filled);
  }
  for (int j = 0; j < k; ++j) idx[t * k + j] = arg[j];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_ffn_route_cuda(const at::Tensor& scores_in,
                                                                     const at::Tensor& bias_in,
                                                                     int64_t k) {
  check_route_inputs(scores_in, bias_in, k, c10::DeviceType::CUDA);
  TORCH_CHECK(k <= kMaxK, "k must be <= ", kMaxK, " on CUDA, got ", k);
  c10::cuda::OptionalCUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  const int64_t T = scores.size(0), nb = scores.size(1);
  const auto long_opts = scores.options().dtype(at::kLong);
  at::Tensor idx = at::empty({T, k}, long_opts);
  if (T == 0) return {idx, at::empty({0}, long_opts), at::zeros({nb + 1}, long_opts)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((T + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "sparse_ffn_route_cuda", [&] {
                                    topk_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                                        scores.data_ptr<scalar_t>(), bias.data_ptr<float>(), T,
                                        nb, static_cast<int>(k), idx.data_ptr<int64_t>());
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  const at::Tensor flat = idx.view(-1);
  at::Tensor order = std::get<1>(at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  at::Tensor counts = at::zeros({nb}, long_opts).index_add_(0, flat, at::ones_like(flat));
  at::Tensor offsets = at::zeros({nb + 1}, long_opts);
  offsets.slice(0, 1).copy_(counts.cumsum(0));
  return {idx, order, offsets};
}

std::tuple<at::Tensor, at::Tensor> sparse_ffn_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                   const std::optional<at::Tensor>& b1,
                                                   const at::Tensor& w2, const at::Tensor& gate,
                                                   const at::Tensor& order,
                                                   const at::Tensor& offsets, int64_t block_size,
                                                   c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_sparse_ffn_inputs(x, w1, b1, w2, gate, order, offsets, block_size, act,
                          c10::DeviceType::CUDA);
  c10::cuda::OptionalCUDAGuard guard(x.device());
  return sparse_ffn_grouped(x.contiguous(), w1.contiguous(), b1, w2.contiguous(),
                            gate.contiguous(), order, offsets, block_size, act);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_ffn_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& gate, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, int64_t block_size, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_sparse_ffn_backward_inputs(grad_out, x, w1, w2, gate, hidden, order, offsets, block_size,
                                   act, c10::DeviceType::CUDA);
  c10::cuda::OptionalCUDAGuard guard(x.device());
  return sparse_ffn_backward_grouped(grad_out.contiguous(), x.contiguous(), w1.contiguous(),
                                     w2.contiguous(), gate.contiguous(), hidden.contiguous(),
                                     order, offsets, block_size, act);
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("sparse_ffn_route", &deepseek_ext::ops::sparse_ffn_route_cuda);
  m.impl("sparse_ffn", &deepseek_ext::ops::sparse_ffn_cuda);
  m.impl("sparse_ffn_backward", &deepseek_ext::ops::sparse_ffn_backward_cuda);
}
