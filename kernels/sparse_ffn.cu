// Gated sparse FFN on CUDA.
//
// sparse_ffn_route: for n_blocks <= 64, one warp per token: lane l holds the
// scores + bias of blocks l and l + 32 in registers (coalesced reads), and k
// rounds of a warp arg-max (shuffles; larger value first, then the lower
// block) pick the blocks in the order of the CPU's insertion list, with no
// per-thread arrays. Wider routers use one thread per token and a k-slot
// insertion list (detail/topk.h, shared with the CPU). The pairs are then
// grouped by block with a stable device sort of the block ids, and the
// offsets are a binary search of the sorted ids. Nothing is read by the host.
//
// sparse_ffn / sparse_ffn_backward: the grouped-GEMM route of
// sparse_ffn_grouped.cpp: sparse_ffn_gather (kernels/sparse_ffn_permute.cu)
// puts x's rows in block order, at::_grouped_mm runs with the block offsets as
// a device tensor (PyTorch's CUTLASS grouped GEMM on sm90 for bfloat16;
// PyTorch's fallback elsewhere), and sparse_ffn_combine sums each token's
// gated block outputs in one pass (no atomics).

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
// Slots of a token's top-k list kept in registers / local memory (the
// thread-per-token kernel, n_blocks > kWarpMaxBlocks).
constexpr int64_t kMaxK = 256;
// The warp-per-token kernel: two blocks per lane.
constexpr int64_t kWarpMaxBlocks = 64;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNone = 1 << 30;  // "no candidate" block index

// idx[t, 0..k) = the k largest scores[t, b] + bias[b], descending, ties to the
// lower b: the same choice as detail::topk_offer (for scores without NaN).
template <typename scalar_t>
__global__ void topk_warp_kernel(const scalar_t* __restrict__ scores,
                                 const float* __restrict__ bias, int64_t T, int nb, int k,
                                 int64_t* __restrict__ idx) {
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= T) return;  // t is the same for the whole warp
  const scalar_t* s = scores + t * nb;
  const int b0 = lane, b1 = lane + 32;
  bool live0 = b0 < nb, live1 = b1 < nb;
  const float v0 = live0 ? static_cast<float>(s[b0]) + bias[b0] : 0.0f;
  const float v1 = live1 ? static_cast<float>(s[b1]) + bias[b1] : 0.0f;
  for (int j = 0; j < k; ++j) {
    // This lane's best candidate left: block b0 unless b1 scores strictly higher.
    float bv = 0.0f;
    int bi = kNone;
    if (live0 && !(live1 && v1 > v0)) {
      bv = v0;
      bi = b0;
    } else if (live1) {
      bv = v1;
      bi = b1;
    }
    // Butterfly arg-max: every lane ends with the same (value, block).
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float ov = __shfl_xor_sync(kFullMask, bv, offset);
      const int oi = __shfl_xor_sync(kFullMask, bi, offset);
      if (oi != kNone && (bi == kNone || ov > bv || (ov == bv && oi < bi))) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) idx[t * k + j] = bi;
    if (bi == b0) live0 = false;
    if (bi == b1) live1 = false;
  }
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "sparse_ffn_route_cuda", [&] {
    if (nb <= kWarpMaxBlocks) {
      const unsigned blocks = static_cast<unsigned>((T + kWarpsPerBlock - 1) / kWarpsPerBlock);
      topk_warp_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          scores.data_ptr<scalar_t>(), bias.data_ptr<float>(), T, static_cast<int>(nb),
          static_cast<int>(k), idx.data_ptr<int64_t>());
    } else {
      const unsigned blocks = static_cast<unsigned>((T + kThreads - 1) / kThreads);
      topk_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          scores.data_ptr<scalar_t>(), bias.data_ptr<float>(), T, nb, static_cast<int>(k),
          idx.data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor flat = idx.view(-1);
  auto [sorted, order] = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  // offsets[b] = the first sorted position whose block is >= b (offsets[nb] = T * k).
  at::Tensor offsets = at::searchsorted(sorted, at::arange(nb + 1, long_opts));
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
