// matmul_unscale_check on the CPU: the GEMM through ATen's BLAS in row panels,
// each panel scaled, converted and checked while it is still in cache.
//
// Inputs are multiplied in float32 (float16/bfloat16 products are exact in
// float32, so this is FP32 accumulation). For each panel of rows, at::mm_out
// (multi-threaded BLAS) writes the float32 panel; then, in parallel over the
// panel, every value is multiplied by inv_scale, converted to out_dtype and
// its *converted* bits checked for inf/NaN (detail/float_bits.h), so a value
// that overflows float16 only in the conversion is caught too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>

#include "deepseek_ext/detail/float_formats.h"
#include "matmul_unscale_check/matmul_unscale_check.h"

namespace deepseek_ext {
namespace ops {
namespace {

using at::vec::Vectorized;

// Rows per panel: about this many bytes of float32 output, so that a panel
// stays in the last-level cache between the GEMM and the epilogue, while
// panels stay large enough that the BLAS's repacking of b per call is noise.
constexpr int64_t kPanelBytes = int64_t{16} << 20;
constexpr int64_t kEpilogueGrain = int64_t{1} << 15;

// out[i] = out_t(acc[i] * s) for i in [0, n); returns true if any out[i] is
// inf/NaN. acc and out may be the same array when out_t is float.
template <typename out_t>
bool scale_convert_check(const float* acc, out_t* out, int64_t n, float s) {
  using Format = bits::format_of_t<out_t>;
  using ibits_t = std::make_signed_t<typename Format::bits_type>;
  using OVec = Vectorized<out_t>;
  using IVec = Vectorized<ibits_t>;
  using FVec = Vectorized<float>;
  const IVec mask(static_cast<ibits_t>(Format::kMagnitudeMask));
  const FVec sv(s);
  IVec max_bits(0);
  int64_t i = 0;
  for (; i + OVec::size() <= n; i += OVec::size()) {
    OVec o;
    if constexpr (std::is_same_v<out_t, float>) {
      o = FVec::loadu(acc + i) * sv;
    } else {
      o = at::vec::convert_from_float<out_t>(FVec::loadu(acc + i) * sv,
                                             FVec::loadu(acc + i + FVec::size()) * sv);
    }
    o.store(out + i);
    max_bits = at::vec::maximum(max_bits, at::vec::cast<ibits_t>(o) & mask);
  }
  ibits_t lanes[IVec::size()];
  max_bits.store(lanes);
  ibits_t m = *std::max_element(lanes, lanes + IVec::size());
  for (; i < n; ++i) {
    out[i] = static_cast<out_t>(acc[i] * s);
    typename Format::bits_type b;
    std::memcpy(&b, &out[i], sizeof b);
    m = std::max(m, static_cast<ibits_t>(bits::magnitude_bits<Format>(b)));
  }
  return bits::max_magnitude_is_nonfinite<Format>(static_cast<typename Format::bits_type>(m));
}

template <typename out_t>
bool parallel_epilogue(const float* acc, out_t* out, int64_t n, float s) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, kEpilogueGrain, [&](int64_t begin, int64_t end) {
    if (scale_convert_check<out_t>(acc + begin, out + begin, end - begin, s)) {
      bad.store(true, std::memory_order_relaxed);
    }
  });
  return bad.load();
}

at::Tensor matmul_unscale_check_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                                    const at::Tensor& found_inf, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out_t = check_matmul_unscale_check_inputs(a, b, inv_scale, found_inf, out_dtype,
                                                                 c10::DeviceType::CPU);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_t));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();  // an empty sum: zeros, all finite

  const float s = *inv_scale.const_data_ptr<float>();
  const at::Tensor b32 = b.scalar_type() == at::kFloat ? b : b.to(at::kFloat);
  const int64_t rows = std::clamp<int64_t>(kPanelBytes / (N * int64_t{sizeof(float)}), 1, M);
  at::Tensor scratch;  // float32 panel when the output is 16-bit
  if (out_t != at::kFloat) scratch = at::empty({rows, N}, a.options().dtype(at::kFloat));

  bool bad = false;
  for (int64_t r = 0; r < M; r += rows) {
    const int64_t h = std::min(rows, M - r);
    at::Tensor a_panel = a.narrow(0, r, h);
    if (a_panel.scalar_type() != at::kFloat) a_panel = a_panel.to(at::kFloat);
    at::Tensor out_panel = out.narrow(0, r, h);  // rows of a contiguous matrix: contiguous
    at::Tensor acc = out_t == at::kFloat ? out_panel : scratch.narrow(0, 0, h);
    at::mm_out(acc, a_panel, b32);
    const float* acc_ptr = acc.const_data_ptr<float>();
    switch (out_t) {
      case at::kFloat: bad |= parallel_epilogue(acc_ptr, out_panel.data_ptr<float>(), h * N, s); break;
      case at::kHalf: bad |= parallel_epilogue(acc_ptr, out_panel.data_ptr<c10::Half>(), h * N, s); break;
      case at::kBFloat16:
        bad |= parallel_epilogue(acc_ptr, out_panel.data_ptr<c10::BFloat16>(), h * N, s);
        break;
      default: TORCH_INTERNAL_ASSERT(false, "unexpected out dtype ", out_t);
    }
  }
  if (bad) found_inf.fill_(1.0f);
  return out;
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("matmul_unscale_check", &deepseek_ext::ops::matmul_unscale_check_cpu);
}
