// matmul_unscale_check on the CPU: the GEMM through ATen's BLAS, its check
// done by the cheapest pass that is exact.
//
// Inputs are multiplied in float32 (float16/bfloat16 products are exact in
// float32, so this is FP32 accumulation). inv_scale is the GEMM's alpha:
// at::addmm_out (multi-threaded BLAS, beta = 0) writes inv_scale * (a @ b) in
// float32. Then, in parallel:
//   * 16-bit output, in row panels while each is still in cache: every value
//     is converted to out_dtype and its *converted* bits checked
//     (detail/float_bits.h), so a value that overflows float16 only in the
//     conversion is caught too.
//   * float32 output: the output is non-finite somewhere exactly when an input
//     is (inf * 0 is NaN, inf - inf is NaN) or the sum overflows float32. When
//     a and b together are smaller than the output (few rows of K: a
//     micro-batch's weight gradient) and a bound from their largest
//     magnitudes rules the overflow out, reading them decides; otherwise the
//     output is read once, in panels, without being written.
// The unfused sequence (matmul, then a scale-and-check pass) reads and writes
// the whole output once more.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <type_traits>

#include "common/cpu_alloc.h"
#include "common/cpu_float_bits.h"
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

template <typename T>
bits_of_t<T> parallel_max_magnitude_bits(const T* x, int64_t n) {
  return at::parallel_reduce(
      0, n, kEpilogueGrain, bits_of_t<T>{0},
      [&](int64_t begin, int64_t end, bits_of_t<T> m) {
        return std::max(m, max_magnitude_bits(x + begin, end - begin));
      },
      [](bits_of_t<T> x0, bits_of_t<T> x1) { return std::max(x0, x1); });
}

// out[i] = out_t(acc[i]) for i in [0, n), a 16-bit out_t; returns true if any
// converted value is inf/NaN.
template <typename out_t>
bool convert_check(const float* acc, out_t* out, int64_t n) {
  using ibits_t = std::make_signed_t<bits_of_t<out_t>>;
  using OVec = Vectorized<out_t>;
  using FVec = Vectorized<float>;
  Vectorized<ibits_t> max_bits(0);
  int64_t i = 0;
  for (; i + OVec::size() <= n; i += OVec::size()) {
    const OVec o = at::vec::convert_from_float<out_t>(FVec::loadu(acc + i), FVec::loadu(acc + i + FVec::size()));
    o.store(out + i);
    max_bits = at::vec::maximum(max_bits, magnitude_bits_vec(o));
  }
  const int64_t tail = i;
  for (; i < n; ++i) out[i] = static_cast<out_t>(acc[i]);
  const bits_of_t<out_t> m = std::max(max_lane<out_t>(max_bits), max_magnitude_bits(out + tail, n - tail));
  return bits::max_magnitude_is_nonfinite<bits::format_of_t<out_t>>(m);
}

template <typename out_t>
bool parallel_convert_check(const float* acc, out_t* out, int64_t n) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, kEpilogueGrain, [&](int64_t begin, int64_t end) {
    if (convert_check<out_t>(acc + begin, out + begin, end - begin)) {
      bad.store(true, std::memory_order_relaxed);
    }
  });
  return bad.load();
}

bool parallel_check(const float* x, int64_t n) {
  return bits::max_magnitude_is_nonfinite<bits::Fp32Format>(parallel_max_magnitude_bits(x, n));
}

// max |t|, +inf when t holds an inf or NaN; nullopt when t does not cover one
// dense block of memory (then it cannot be read as a flat array).
template <typename T>
double absmax_from_bits(bits_of_t<T> m) {
  if (bits::max_magnitude_is_nonfinite<bits::format_of_t<T>>(m)) return std::numeric_limits<double>::infinity();
  T v;
  std::memcpy(&v, &m, sizeof v);
  return static_cast<double>(static_cast<float>(v));
}

std::optional<double> dense_absmax(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return std::nullopt;
  const int64_t n = t.numel();
  switch (t.scalar_type()) {
    case at::kFloat: return absmax_from_bits<float>(parallel_max_magnitude_bits(t.const_data_ptr<float>(), n));
    case at::kHalf:
      return absmax_from_bits<c10::Half>(parallel_max_magnitude_bits(t.const_data_ptr<c10::Half>(), n));
    case at::kBFloat16:
      return absmax_from_bits<c10::BFloat16>(parallel_max_magnitude_bits(t.const_data_ptr<c10::BFloat16>(), n));
    default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", t.scalar_type());
  }
}

// Whether s * (a @ b), computed in float32 with K terms a sum, has an inf or
// NaN, decided from a and b alone; nullopt when they cannot decide it. Every
// partial sum is at most K * max|a| * max|b| * (1 + 2 K u) (u = 2^-24, for
// K u <= 1/4), in any order of summation. The BLAS may apply alpha to a first
// or to the sums last, so the bound takes max(1, |s|) times that; alpha adds
// at most two roundings, and a bound below FLT_MAX / 4 leaves a wide margin.
std::optional<bool> nonfinite_from_inputs(const at::Tensor& a, const at::Tensor& b, float s, int64_t K) {
  const double u = std::ldexp(1.0, -24);
  if (!std::isfinite(s) || static_cast<double>(K) * u > 0.25) return std::nullopt;  // the output decides
  const std::optional<double> amax = dense_absmax(a);
  if (!amax) return std::nullopt;
  if (std::isinf(*amax)) return true;
  const std::optional<double> bmax = dense_absmax(b);
  if (!bmax) return std::nullopt;
  if (std::isinf(*bmax)) return true;
  const double bound = std::max(1.0, std::fabs(static_cast<double>(s))) * K * *amax * *bmax * (1.0 + 2.0 * K * u);
  if (bound < std::numeric_limits<float>::max() / 4) return false;
  return std::nullopt;
}

std::atomic<int64_t> checks_from_inputs{0};

at::Tensor matmul_unscale_check_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                                    const at::Tensor& found_inf, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out_t = check_matmul_unscale_check_inputs(a, b, inv_scale, found_inf, out_dtype,
                                                                 c10::DeviceType::CPU);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = empty_for_write({M, N}, a.options().dtype(out_t));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();  // an empty sum: zeros, all finite

  const float s = *inv_scale.const_data_ptr<float>();
  // beta = 0: the old contents of the output are never read (BLAS semantics).
  // A BLAS may skip a and b when alpha is 0, which would hide their inf/NaN,
  // so a scale that is not a normal float is applied after the GEMM.
  const bool alpha_in_gemm = std::isnormal(s);
  const at::Tensor b32 = b.scalar_type() == at::kFloat ? b : b.to(at::kFloat);
  const auto gemm = [&](at::Tensor& acc, const at::Tensor& a_rows) {
    at::addmm_out(acc, acc, a_rows.scalar_type() == at::kFloat ? a_rows : a_rows.to(at::kFloat), b32,
                  /*beta=*/0, /*alpha=*/alpha_in_gemm ? s : 1.0f);
    if (!alpha_in_gemm) acc.mul_(s);
  };

  const std::optional<bool> decided = out_t == at::kFloat && M * K + K * N < M * N
                                          ? nonfinite_from_inputs(a, b, s, K)
                                          : std::nullopt;
  bool bad = false;
  if (decided) {
    checks_from_inputs.fetch_add(1, std::memory_order_relaxed);
    gemm(out, a);
    bad = *decided;
  } else {
    const int64_t rows = std::clamp<int64_t>(kPanelBytes / (N * int64_t{sizeof(float)}), 1, M);
    at::Tensor scratch;  // float32 panel when the output is 16-bit
    if (out_t != at::kFloat) scratch = empty_for_write({rows, N}, a.options().dtype(at::kFloat));
    for (int64_t r = 0; r < M; r += rows) {
      const int64_t h = std::min(rows, M - r);
      at::Tensor out_panel = out.narrow(0, r, h);  // rows of a contiguous matrix: contiguous
      at::Tensor acc = out_t == at::kFloat ? out_panel : scratch.narrow(0, 0, h);
      gemm(acc, a.narrow(0, r, h));
      const float* acc_ptr = acc.const_data_ptr<float>();
      switch (out_t) {
        case at::kFloat: bad |= parallel_check(acc_ptr, h * N); break;
        case at::kHalf: bad |= parallel_convert_check(acc_ptr, out_panel.data_ptr<c10::Half>(), h * N); break;
        case at::kBFloat16:
          bad |= parallel_convert_check(acc_ptr, out_panel.data_ptr<c10::BFloat16>(), h * N);
          break;
        default: TORCH_INTERNAL_ASSERT(false, "unexpected out dtype ", out_t);
      }
    }
  }
  if (bad) found_inf.fill_(1.0f);
  return out;
}

}  // namespace

int64_t matmul_unscale_check_cpu_checks_from_inputs() { return checks_from_inputs.load(); }

}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("matmul_unscale_check", &deepseek_ext::ops::matmul_unscale_check_cpu);
}
