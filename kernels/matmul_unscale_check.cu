// matmul_unscale_check on CUDA.
//
// Route (documented in README "Mixed precision"), first that takes the call:
//   * sm_90, float16/bfloat16 inputs in the weight-gradient layout, float32
//     output, when the build has the CUTLASS 3 kernel (DSX_WITH_CUTLASS_SM90):
//     one fused kernel, see matmul_unscale_check_sm90.cu.
//   * sm_8x (an image built for an 8.x arch is what the device loads), the
//     same layout, float32 or input-dtype output, when the build has the
//     CUTLASS 2 kernel (DSX_WITH_CUTLASS_SM80): one fused kernel, see
//     matmul_unscale_check_sm80.cu. It declines on Hopper in the default
//     "8.0;9.0a" build, where cuBLAS (wgmma) + the pass below is expected to
//     beat an mma.sync kernel.
//   * otherwise (unfused): cuBLAS through at::mm with float32 output, then
//     one pass that multiplies by inv_scale, converts to out_dtype and flags
//     non-finite converted values. inv_scale and found_inf stay on the device.
// Each fused kernel counts the calls it took (fused_sm90_calls, fused_sm80_calls)
// so tests and benchmarks can prove the route; a kernel that declines a shape
// (layout, alignment, launch limits) leaves it to the next route silently.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <optional>

#include "deepseek_ext/detail/float_bits.h"
#include "matmul_unscale_check/matmul_unscale_check.h"

namespace deepseek_ext {
namespace ops {

#if defined(DSX_WITH_CUTLASS_SM90)
// Defined in matmul_unscale_check_sm90.cu; returns false when the fused kernel
// cannot take these operands (then the unfused route runs).
bool matmul_unscale_check_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                               const at::Tensor& found_inf, const at::Tensor& out);
#endif
#if defined(DSX_WITH_CUTLASS_SM80)
// Defined in matmul_unscale_check_sm80.cu; returns false when the fused kernel
// cannot take these operands or has no code for this device.
bool matmul_unscale_check_sm80(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                               const at::Tensor& found_inf, const at::Tensor& out);
#endif

namespace {
std::atomic<int64_t> fused_sm90_calls{0};
std::atomic<int64_t> fused_sm80_calls{0};
}  // namespace

// Host-side count of calls that took the fused sm90 kernel (tests use it to
// prove the route ran; a declined shape would silently take cuBLAS).
int64_t matmul_unscale_check_fused_sm90_calls() { return fused_sm90_calls.load(); }
// The same for the fused sm80 (Ampere) kernel.
int64_t matmul_unscale_check_fused_sm80_calls() { return fused_sm80_calls.load(); }

namespace {

constexpr int kThreads = 256;

template <typename out_t>
struct OutBits;
template <>
struct OutBits<float> {
  using format = bits::Fp32Format;
  __device__ static uint32_t store(float* p, float v) {
    *p = v;
    return __float_as_uint(v);
  }
};
template <>
struct OutBits<c10::Half> {
  using format = bits::Fp16Format;
  __device__ static uint16_t store(c10::Half* p, float v) {
    const c10::Half h(v);
    *p = h;
    return h.x;
  }
};
template <>
struct OutBits<c10::BFloat16> {
  using format = bits::Bf16Format;
  __device__ static uint16_t store(c10::BFloat16* p, float v) {
    const c10::BFloat16 h(v);
    *p = h;
    return h.x;
  }
};

// out[i] = out_t(acc[i] * inv_scale); found_inf = 1 if any out[i] is inf/NaN.
// Four float32 values per thread per step through one 16-byte load.
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    scale_convert_check_kernel(const float* acc, out_t* out, int64_t n, const float* inv_scale,
                               float* found_inf) {
  using Format = typename OutBits<out_t>::format;
  using bits_t = typename Format::bits_type;
  const float s = *inv_scale;
  bits_t max_mag = 0;
  const int64_t n4 = n / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < n4; v += stride) {
    const float4 x = reinterpret_cast<const float4*>(acc)[v];
    const float vals[4] = {x.x * s, x.y * s, x.z * s, x.w * s};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const bits_t m = bits::magnitude_bits<Format>(OutBits<out_t>::store(out + 4 * v + l, vals[l]));
      max_mag = m > max_mag ? m : max_mag;
    }
  }
  for (int64_t i = 4 * n4 + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const bits_t m = bits::magnitude_bits<Format>(OutBits<out_t>::store(out + i, acc[i] * s));
    max_mag = m > max_mag ? m : max_mag;
  }
  if (__syncthreads_or(bits::max_magnitude_is_nonfinite<Format>(max_mag)) && threadIdx.x == 0) {
    *found_inf = 1.0f;
  }
}

template <typename out_t>
void launch_epilogue(const at::Tensor& acc, const at::Tensor& out, const at::Tensor& inv_scale,
                     const at::Tensor& found_inf, cudaStream_t stream) {
  const int64_t n = acc.numel();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n / 4 + kThreads - 1) / kThreads + 1, int64_t{sms} * 8);
  scale_convert_check_kernel<out_t><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
      acc.const_data_ptr<float>(), out.data_ptr<out_t>(), n, inv_scale.const_data_ptr<float>(),
      found_inf.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor matmul_unscale_check_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                                     const at::Tensor& found_inf, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out_t = check_matmul_unscale_check_inputs(a, b, inv_scale, found_inf, out_dtype,
                                                                 c10::DeviceType::CUDA);
  const c10::cuda::OptionalCUDAGuard guard(a.device());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_t));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
#if defined(DSX_WITH_CUTLASS_SM90)
  if (a.scalar_type() != at::kFloat && at::cuda::getCurrentDeviceProperties()->major == 9 &&
      matmul_unscale_check_sm90(a, b, inv_scale, found_inf, out)) {
    fused_sm90_calls.fetch_add(1, std::memory_order_relaxed);
    return out;
  }
#endif
#if defined(DSX_WITH_CUTLASS_SM80)
  if (a.scalar_type() != at::kFloat && matmul_unscale_check_sm80(a, b, inv_scale, found_inf, out)) {
    fused_sm80_calls.fetch_add(1, std::memory_order_relaxed);
    return out;
  }
#endif
  // cuBLAS accumulates in float32 and writes float32 (transposed views are
  // passed to it as transposed operands, not copied).
  const at::Tensor acc = a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (out_t) {
    case at::kFloat: launch_epilogue<float>(acc, acc, inv_scale, found_inf, stream); return acc;
    case at::kHalf: launch_epilogue<c10::Half>(acc, out, inv_scale, found_inf, stream); return out;
    case at::kBFloat16: launch_epilogue<c10::BFloat16>(acc, out, inv_scale, found_inf, stream); return out;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected out dtype ", out_t);
  }
  return out;
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("matmul_unscale_check", &deepseek_ext::ops::matmul_unscale_check_cuda);
}
