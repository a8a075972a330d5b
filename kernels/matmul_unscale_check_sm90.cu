// matmul_unscale_check on Hopper (sm_90a): one CUTLASS 3 kernel, TMA loads,
// warp-specialised wgmma mainloop, and an epilogue visitor tree that
//   1. multiplies the float32 accumulators by *inv_scale (read on the device),
//   2. flags any value that is inf/NaN *after* conversion to the output dtype,
//   3. stores D,
// so the GEMM, the unscale and the overflow check are one pass over the output.
//
// Instantiated for what a Linear weight-gradient GEMM needs and nothing more:
// a = grad_out^T (a transposed view: column-major A), b = input (row-major B),
// float16 or bfloat16 operands, float32 output (master gradients). Two tile
// shapes, chosen by a documented heuristic (pick_large_tile). Anything else
// returns false and takes the unfused cuBLAS route in matmul_unscale_check.cu.

#include "matmul_unscale_check_sm90.cuh"

namespace deepseek_ext {
namespace ops {
namespace sm90 {

// 128x256 tiles with 2-CTA clusters once the output has at least one full wave
// of them on the GPU; 128x128 tiles (more CTAs) below that.
inline bool pick_large_tile(int64_t M, int64_t N, int sm_count) {
  return (M / 128) * (N / 256) >= sm_count;
}

template <class ElementAB>
bool dispatch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale, const at::Tensor& found_inf,
              const at::Tensor& out) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (pick_large_tile(a.size(0), b.size(1), sms)) {
    return FusedWgradGemm<ElementAB, Shape<_128, _256, _64>, Shape<_2, _1, _1>>::run(a, b, inv_scale, found_inf,
                                                                                       out);
  }
  return FusedWgradGemm<ElementAB, Shape<_128, _128, _64>, Shape<_1, _1, _1>>::run(a, b, inv_scale, found_inf,
                                                                                     out);
}

}  // namespace sm90

bool matmul_unscale_check_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                               const at::Tensor& found_inf, const at::Tensor& out) {
  // The instantiated layouts, dtypes and TMA's 16-byte alignment rules.
  const bool layouts = a.stride(0) == 1 && b.stride(1) == 1 && out.scalar_type() == at::kFloat &&
                       out.is_contiguous();
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  // Leading dimensions must be real (not expanded, stride 0) and 16-byte multiples.
  const bool strides = a.stride(1) >= a.size(0) && b.stride(0) >= b.size(1) && a.stride(1) > 0 && b.stride(0) > 0;
  if (!layouts || !strides || !aligned(a) || !aligned(b) || !aligned(out) || a.stride(1) % 8 != 0 ||
      b.stride(0) % 8 != 0 ||
      out.size(1) % 4 != 0 || a.size(0) > INT32_MAX || a.size(1) > INT32_MAX || b.size(1) > INT32_MAX) {
    return false;
  }
  switch (a.scalar_type()) {
    case at::kHalf: return sm90::dispatch<cutlass::half_t>(a, b, inv_scale, found_inf, out);
    case at::kBFloat16: return sm90::dispatch<cutlass::bfloat16_t>(a, b, inv_scale, found_inf, out);
    default: return false;
  }
}

}  // namespace ops
}  // namespace deepseek_ext
