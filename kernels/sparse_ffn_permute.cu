// CUDA kernels of sparse_ffn_gather and sparse_ffn_combine: the row movers of
// the gated sparse FFN between token order and block order (their CPU twins,
// the tests' reference, are in csrc/ops/sparse_ffn/cpu/sparse_ffn_permute_cpu.cpp).
//
// gather: out[i] = x[order[i] / k], one thread block per output row, 16-byte
// vector loads and stores when every row starts 16-byte aligned.
// combine: out[t] = sum_j gate[t, j] * y[pos[t * k + j]] with pos the inverse
// of `order` (one small scatter kernel), one thread block per token, each
// thread summing its 16-byte column packs over j in ascending order in
// float32 (float64 for double): every output row is written once, no atomics.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "sparse_ffn/sparse_ffn.h"

namespace deepseek_ext {
namespace ops {
namespace {

constexpr int kRowThreads = 128;
// Rows (gather) or tokens (combine) per launch at most: a grid-stride loop
// covers the rest.
constexpr int64_t kMaxGrid = int64_t{1} << 20;

// N elements of T moved as one 16-byte (or smaller, for N = 1) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, int N>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x,
                                   const int64_t* __restrict__ order, int64_t P, int64_t k,
                                   int64_t packs, scalar_t* __restrict__ out) {
  using P_t = Pack<scalar_t, N>;
  for (int64_t i = blockIdx.x; i < P; i += gridDim.x) {
    const P_t* src = reinterpret_cast<const P_t*>(x) + (order[i] / k) * packs;
    P_t* dst = reinterpret_cast<P_t*>(out) + i * packs;
    for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) dst[c] = src[c];
  }
}

__global__ void inverse_permutation_kernel(const int64_t* __restrict__ order, int64_t P,
                                           int64_t* __restrict__ pos) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < P) pos[order[i]] = i;
}

template <typename scalar_t, int N>
__global__ void combine_rows_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ pos,
                                    const scalar_t* __restrict__ gate, int64_t T, int64_t k,
                                    int64_t packs, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using P_t = Pack<scalar_t, N>;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
      acc_t acc[N];
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] = acc_t(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = t * k + j;
        const acc_t g = gate != nullptr ? static_cast<acc_t>(gate[p]) : acc_t(1);
        const P_t v = reinterpret_cast<const P_t*>(y)[pos[p] * packs + c];
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] = fma(g, static_cast<acc_t>(v.v[e]), acc[e]);
      }
      P_t o;
#pragma unroll
      for (int e = 0; e < N; ++e) o.v[e] = static_cast<scalar_t>(acc[e]);
      reinterpret_cast<P_t*>(out)[t * packs + c] = o;
    }
  }
}

// Elements per 16-byte access when every row of `a` and `b` (D elements
// each) starts 16-byte aligned; 1 otherwise.
int vector_width(int64_t D, int64_t element_size, const void* a, const void* b) {
  const int64_t n = 16 / element_size;
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(b) % 16 == 0 && (D * element_size) % 16 == 0;
  return aligned ? static_cast<int>(n) : 1;
}

unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, kMaxGrid)));
}

at::Tensor sparse_ffn_gather_cuda(const at::Tensor& x_in, const at::Tensor& order_in, int64_t k) {
  check_gather_inputs(x_in, order_in, k, c10::DeviceType::CUDA);
  c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const int64_t P = order.numel(), D = x.size(1);
  at::Tensor out = at::empty({P, D}, x.options());
  if (P == 0 || D == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_ffn_gather_cuda", [&] {
    const int64_t n = 16 / static_cast<int64_t>(sizeof(scalar_t));
    if (vector_width(D, sizeof(scalar_t), x.const_data_ptr(), out.data_ptr()) == n) {
      constexpr int N = 16 / sizeof(scalar_t);
      gather_rows_kernel<scalar_t, N><<<grid_for(P), kRowThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), P, k, D / N,
          out.data_ptr<scalar_t>());
    } else {
      gather_rows_kernel<scalar_t, 1><<<grid_for(P), kRowThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), P, k, D,
          out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sparse_ffn_combine_cuda(const at::Tensor& y_in, const at::Tensor& order_in, int64_t k,
                                   const std::optional<at::Tensor>& gate_in) {
  check_combine_inputs(y_in, order_in, k, gate_in, c10::DeviceType::CUDA);
  c10::cuda::OptionalCUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const bool has_gate = gate_in.has_value() && gate_in->defined();
  const at::Tensor gate = has_gate ? gate_in->contiguous() : at::Tensor();
  const int64_t P = y.size(0), D = y.size(1), T = P / k;
  at::Tensor out = at::empty({T, D}, y.options());
  if (T == 0 || D == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor pos = at::empty({P}, order.options());
  constexpr int kScatterThreads = 256;
  inverse_permutation_kernel<<<static_cast<unsigned>((P + kScatterThreads - 1) / kScatterThreads),
                               kScatterThreads, 0, stream>>>(order.const_data_ptr<int64_t>(), P,
                                                             pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "sparse_ffn_combine_cuda", [&] {
    const scalar_t* g = has_gate ? gate.const_data_ptr<scalar_t>() : nullptr;
    const int64_t n = 16 / static_cast<int64_t>(sizeof(scalar_t));
    if (vector_width(D, sizeof(scalar_t), y.const_data_ptr(), out.data_ptr()) == n) {
      constexpr int N = 16 / sizeof(scalar_t);
      combine_rows_kernel<scalar_t, N><<<grid_for(T), kRowThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), pos.const_data_ptr<int64_t>(), g, T, k, D / N,
          out.data_ptr<scalar_t>());
    } else {
      combine_rows_kernel<scalar_t, 1><<<grid_for(T), kRowThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), pos.const_data_ptr<int64_t>(), g, T, k, D,
          out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("sparse_ffn_gather", &deepseek_ext::ops::sparse_ffn_gather_cuda);
  m.impl("sparse_ffn_combine", &deepseek_ext::ops::sparse_ffn_combine_cuda);
}
