// unscale_and_check_ on CUDA: one multi-tensor launch over the whole list.
//
// Each block owns a chunk of kChunkElems elements of one tensor. Threads move
// 16 bytes at a time (4 float32 or 8 float16/bfloat16 values), kUnroll loads in
// flight before any use, check every value for inf/NaN on its raw bits (see
// detail/float_bits.h: immune to fast-math), and, unless inv_scale is exactly
// 1, write value * inv_scale back in float arithmetic. A block that saw a
// non-finite value writes found_inf once. inv_scale is read on the device:
// the host never waits.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>

#include "deepseek_ext/detail/float_bits.h"
#include "multi_tensor_apply.cuh"
#include "unscale_and_check/unscale_and_check.h"

namespace deepseek_ext {
namespace ops {
namespace {

using cuda::ElemType;
using cuda::MixedTensorList;

constexpr int kThreads = 512;
constexpr int kUnroll = 4;
constexpr int64_t kChunkElems = 16384;

template <typename Format>
struct Codec;

template <>
struct Codec<bits::Fp32Format> {
  __device__ static float to_float(uint32_t b) { return __uint_as_float(b); }
  __device__ static uint32_t from_float(float f) { return __float_as_uint(f); }
};
template <>
struct Codec<bits::Fp16Format> {
  __device__ static float to_float(uint16_t b) {
    return static_cast<float>(c10::Half(b, c10::Half::from_bits()));
  }
  __device__ static uint16_t from_float(float f) { return c10::Half(f).x; }
};
template <>
struct Codec<bits::Bf16Format> {
  __device__ static float to_float(uint16_t b) {
    return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()));
  }
  __device__ static uint16_t from_float(float f) { return c10::BFloat16(f).x; }
};

template <typename Format>
__device__ __forceinline__ void unscale_lanes(uint4& v, float s,
                                              typename Format::bits_type& max_mag, bool write) {
  using bits_t = typename Format::bits_type;
  constexpr int kLanes = 16 / sizeof(bits_t);
  bits_t lanes[kLanes];
  memcpy(lanes, &v, 16);
#pragma unroll
  for (int l = 0; l < kLanes; ++l) {
    const bits_t m = bits::magnitude_bits<Format>(lanes[l]);
    max_mag = m > max_mag ? m : max_mag;
    if (write) lanes[l] = Codec<Format>::from_float(Codec<Format>::to_float(lanes[l]) * s);
  }
  if (write) memcpy(&v, lanes, 16);
}

// Processes data[0, n) of one chunk; returns true if it held an inf or NaN.
template <typename Format>
__device__ bool unscale_chunk(typename Format::bits_type* data, int64_t n, float s, bool write) {
  using bits_t = typename Format::bits_type;
  constexpr int kLanes = 16 / sizeof(bits_t);
  bits_t max_mag = 0;
  int64_t scalar_begin = 0;
  if (reinterpret_cast<uintptr_t>(data) % 16 == 0) {
    uint4* vec = reinterpret_cast<uint4*>(data);
    const int64_t nvec = n / kLanes;
    for (int64_t base = 0; base < nvec; base += int64_t{kThreads} * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + u * kThreads + threadIdx.x;
        if (k < nvec) v[u] = vec[k];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + u * kThreads + threadIdx.x;
        if (k < nvec) {
          unscale_lanes<Format>(v[u], s, max_mag, write);
          if (write) vec[k] = v[u];
        }
      }
    }
    scalar_begin = nvec * kLanes;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < n; i += kThreads) {
    const bits_t b = data[i];
    const bits_t m = bits::magnitude_bits<Format>(b);
    max_mag = m > max_mag ? m : max_mag;
    if (write) data[i] = Codec<Format>::from_float(Codec<Format>::to_float(b) * s);
  }
  return bits::max_magnitude_is_nonfinite<Format>(max_mag);
}

__global__ void __launch_bounds__(kThreads)
    unscale_and_check_kernel(MixedTensorList list, float* found_inf, const float* inv_scale) {
  const int32_t chunk = static_cast<int32_t>(blockIdx.x);
  const int t = cuda::tensor_of_chunk(list, chunk);
  const int64_t begin = static_cast<int64_t>(chunk - list.chunk_begin[t]) * kChunkElems;
  const int64_t n = min(kChunkElems, list.numel[t] - begin);
  const float s = *inv_scale;
  const bool write = s != 1.0f;  // exactly 1: check only, no write pass
  bool bad = false;
  switch (list.dtype[t]) {
    case ElemType::kFloat:
      bad = unscale_chunk<bits::Fp32Format>(static_cast<uint32_t*>(list.data[t]) + begin, n, s,
                                            write);
      break;
    case ElemType::kHalf:
      bad = unscale_chunk<bits::Fp16Format>(static_cast<uint16_t*>(list.data[t]) + begin, n, s,
                                            write);
      break;
    case ElemType::kBFloat16:
      bad = unscale_chunk<bits::Bf16Format>(static_cast<uint16_t*>(list.data[t]) + begin, n, s,
                                            write);
      break;
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
}

void unscale_and_check_cuda(at::TensorList grads, const at::Tensor& found_inf,
                            const at::Tensor& inv_scale) {
  check_unscale_and_check_inputs(grads, found_inf, inv_scale, c10::DeviceType::CUDA);
  if (grads.empty()) return;
  const c10::cuda::OptionalCUDAGuard guard(found_inf.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<at::Tensor> flat = flat_views(grads);
  float* found = found_inf.data_ptr<float>();
  const float* s = inv_scale.const_data_ptr<float>();
  cuda::multi_tensor_apply(flat, kChunkElems, [&](const MixedTensorList& list, int32_t chunks) {
    unscale_and_check_kernel<<<chunks, kThreads, 0, stream>>>(list, found, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Copies of non-dense views go back; the write is a no-op when inv_scale is
  // 1, but deciding that would need the host to read inv_scale.
  copy_back(grads, flat);
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("unscale_and_check_", &deepseek_ext::ops::unscale_and_check_cuda);
}
