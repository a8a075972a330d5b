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
//
// On CPUs where oneDNN packs bfloat16 for its AMX micro-kernel (AMX-BF16:
// cpublas::could_pack), bfloat16 inputs skip the float32 copies. ATen has no
// bfloat16 x bfloat16 -> float32 GEMM on the CPU, so the product runs tile by
// tile through cpublas::brgemm (oneDNN's batch-reduce micro-kernel, float32
// accumulation), and each 128 x 32 tile is scaled, converted to out_dtype and
// checked while in cache: one pass, for either output dtype. b is packed once
// into the kernel's layout; a transposed `a` is gathered once into rows.
// AMX reads bfloat16 subnormals as zero, as torch's own
// bfloat16 matmul does on these CPUs. DEEPSEEK_EXT_CPU_BF16_GEMM=0 keeps the
// float32 route (common/runtime_options.h).
//
// On CPUs where torch's float16 GEMM is oneDNN's (AVX512-FP16),
// float16 inputs with a float16 output take it directly, inv_scale as its
// alpha (float32 accumulation, one rounding to float16), and each row panel
// of float16 results is checked while in cache (native_fp16_panels). ATen
// has no float16 x float16 -> float32 CPU GEMM, so a float32 output keeps the
// float32 route. DEEPSEEK_EXT_CPU_FP16_GEMM=0 turns the float16 route off.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // AVX2 paths when built for it; the AVX512-BF16 conversion (target attribute) always
#endif

#include "common/cpu_alloc.h"
#include "common/cpu_float_bits.h"
#include "common/runtime_options.h"
#include "deepseek_ext/detail/float_formats.h"
#include "matmul_unscale_check/matmul_unscale_check.h"

namespace deepseek_ext {
namespace ops {

bool native_bf16_gemm();
bool native_fp16_gemm();

namespace {

using at::vec::Vectorized;

// Rows per panel: about this many bytes of float32 output, so that a panel
// stays in the last-level cache between the GEMM and the epilogue (unless the
// BLAS's repacking of b per call would cost more: see the panel loop).
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

// A 16-bit operand in float32 for the BLAS, converted once, in its own dense
// layout (a transposed view stays one, which the BLAS reads without a copy),
// into memory the copy writes in full and so backs with huge pages when large
// (a plain .to(kFloat) writes fresh memory that takes a page fault per 4 KiB).
at::Tensor float32_for_blas(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t;
  const at::TensorOptions f32 = t.options().dtype(at::kFloat);
  if (!t.is_contiguous() && t.t().is_contiguous()) {
    return empty_for_write({t.size(1), t.size(0)}, f32).copy_(t.t()).t();
  }
  return empty_for_write(t.sizes(), f32).copy_(t);
}

// Output tile of the brgemm route: 128 rows by 32 columns (16 KiB of float32)
// stays in L1/L2 between the micro-kernel and the epilogue, and K is not
// blocked: one pass of the micro-kernel over the whole K per tile. Other
// tiles (32 to 256 rows, 32 to 64 columns, K blocked or not) are no faster.
constexpr int64_t kTileM = 128;
constexpr int64_t kTileN = 32;  // also the packed B's leading dimension: a multiple of 16
constexpr int64_t kPackedPanelBytes = int64_t{1} << 20;

// Tile j of b (K_even rows, columns n0 .. n0 + cols, any strides) in the
// micro-kernel's bfloat16 layout (VNNI): pairs of rows interleaved,
// packed[k / 2][n][k % 2] = b[k][n0 + n], with kTileN columns per pair, the
// ones past `cols` zero.
void pack_b_tile(const c10::BFloat16* b, int64_t sb0, int64_t sb1, int64_t K_even, int64_t cols,
                 c10::BFloat16* packed) {
  for (int64_t k = 0; k < K_even; k += 2) {
    const c10::BFloat16* r0 = b + k * sb0;
    const c10::BFloat16* r1 = r0 + sb0;
    c10::BFloat16* dst = packed + k * kTileN;
    int64_t n = 0;
#if defined(__AVX2__)
    if (sb1 == 1) {  // 16 columns of the two rows at a time
      for (; n + 16 <= cols; n += 16) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + n));
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + n));
        const __m256i lo = _mm256_unpacklo_epi16(x, y);  // x0 y0 .. x3 y3 | x8 y8 .. x11 y11
        const __m256i hi = _mm256_unpackhi_epi16(x, y);  // x4 y4 .. x7 y7 | x12 y12 .. x15 y15
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * n), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * n + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
      }
    }
#endif
    for (; n < cols; ++n) {
      dst[2 * n] = r0[n * sb1];
      dst[2 * n + 1] = r1[n * sb1];
    }
    std::fill(dst + 2 * cols, dst + 2 * kTileN, c10::BFloat16(0.0f));
  }
}

#if defined(__AVX2__)
// dst[j * ld_dst + i] = src[i * ld_src + j] for a 16 x 16 block of 16-bit values.
void transpose_16x16(const c10::BFloat16* src, int64_t ld_src, c10::BFloat16* dst, int64_t ld_dst) {
  __m256i row[16];
  for (int i = 0; i < 16; ++i) row[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * ld_src));
  // Pairs of rows interleaved: each 32-bit unit holds rows (2i, 2i + 1) of one
  // column; lo: columns 0-3 | 8-11 (128-bit lanes), hi: columns 4-7 | 12-15.
  __m256i lo[8], hi[8];
  for (int i = 0; i < 8; ++i) {
    lo[i] = _mm256_unpacklo_epi16(row[2 * i], row[2 * i + 1]);
    hi[i] = _mm256_unpackhi_epi16(row[2 * i], row[2 * i + 1]);
  }
  const auto finish = [&](const __m256i* x, int col0) {
    __m256i col[2][4];  // [rows 0-7 | 8-15][column col0 + c], lane 1 holding column col0 + c + 8
    for (int g = 0; g < 2; ++g) {
      const __m256i* p = x + 4 * g;
      const __m256i a01lo = _mm256_unpacklo_epi32(p[0], p[1]), a01hi = _mm256_unpackhi_epi32(p[0], p[1]);
      const __m256i a23lo = _mm256_unpacklo_epi32(p[2], p[3]), a23hi = _mm256_unpackhi_epi32(p[2], p[3]);
      col[g][0] = _mm256_unpacklo_epi64(a01lo, a23lo);
      col[g][1] = _mm256_unpackhi_epi64(a01lo, a23lo);
      col[g][2] = _mm256_unpacklo_epi64(a01hi, a23hi);
      col[g][3] = _mm256_unpackhi_epi64(a01hi, a23hi);
    }
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (col0 + c) * ld_dst),
                          _mm256_permute2x128_si256(col[0][c], col[1][c], 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (col0 + c + 8) * ld_dst),
                          _mm256_permute2x128_si256(col[0][c], col[1][c], 0x31));
    }
  };
  finish(lo, 0);
  finish(hi, 4);
}
#endif

// rows x K_even of a (any strides) into dst, row-major with leading dimension
// ld, reading along the smaller stride.
void gather_a_rows(const c10::BFloat16* a, int64_t sa0, int64_t sa1, int64_t rows, int64_t K_even, int64_t ld,
                   c10::BFloat16* dst) {
  if (sa0 <= sa1) {  // a transposed view (a Linear's weight gradient): columns are contiguous
    int64_t r_done = 0;
#if defined(__AVX2__)
    if (sa0 == 1) {  // 16 x 16 blocks, k by k along the contiguous columns
      r_done = rows - rows % 16;
      const int64_t k_blocks = K_even - K_even % 16;
      for (int64_t k = 0; k < k_blocks; k += 16) {
        for (int64_t r = 0; r < r_done; r += 16) transpose_16x16(a + r + k * sa1, sa1, dst + r * ld + k, ld);
      }
      for (int64_t k = k_blocks; k < K_even; ++k) {
        for (int64_t r = 0; r < r_done; ++r) dst[r * ld + k] = a[r + k * sa1];
      }
    }
#endif
    for (int64_t k = 0; k < K_even; ++k) {
      for (int64_t r = r_done; r < rows; ++r) dst[r * ld + k] = a[r * sa0 + k * sa1];
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < K_even; ++k) dst[r * ld + k] = a[r * sa0 + k * sa1];
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define DSX_HAVE_AVX512_BF16_CONVERT 1
// out[r, :cols] = bfloat16(acc[r, :cols]) for the rows of one tile (round to
// nearest even; inf on overflow; NaN stays NaN) with AVX512-BF16's
// one-instruction conversion, which the AVX2 build of at::vec emulates in about
// ten; returns whether any converted value is inf/NaN. Only called where the
// CPU has it (cpu_has_avx512_bf16; every AMX-BF16 CPU so far has it too).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) bool convert_check_bf16_avx512(
    const float* acc, int64_t ld_acc, c10::BFloat16* out, int64_t ld_out, int64_t rows, int64_t cols) {
  __m512i max_bits = _mm512_setzero_si512();
  const __m512i magnitude = _mm512_set1_epi16(0x7fff);
  uint16_t m = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = acc + r * ld_acc;
    c10::BFloat16* o = out + r * ld_out;
    int64_t i = 0;
    for (; i + 32 <= cols; i += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(a + i));
      __m512i bits;
      std::memcpy(&bits, &v, sizeof bits);
      _mm512_storeu_si512(o + i, bits);
      max_bits = _mm512_max_epu16(max_bits, _mm512_and_si512(bits, magnitude));
    }
    for (; i < cols; ++i) {
      o[i] = static_cast<c10::BFloat16>(a[i]);
      m = std::max<uint16_t>(m, o[i].x & 0x7fff);
    }
  }
  uint16_t lanes[32];
  _mm512_storeu_si512(lanes, max_bits);
  m = std::max(m, *std::max_element(std::begin(lanes), std::end(lanes)));
  return bits::max_magnitude_is_nonfinite<bits::Bf16Format>(m);
}

// DEEPSEEK_EXT_DISABLE_AVX512 (common/runtime_options.h) forces at::vec's AVX2
// conversion, to test it on an AVX-512 machine.
bool cpu_has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && !runtime_options::avx512_disabled();
  return yes;
}
#endif

// For the rows of one tile: acc[r, :cols] = s * (acc[r, :cols] + a_last[r] *
// b_last[:cols]) (acc = 0 first when `fresh`; no a_last term when K is even),
// then dst[r, :cols] = out_t(acc[r, :cols]) for a 16-bit out_t (for float32,
// dst is acc). Returns whether any result in out_t is inf/NaN.
template <typename out_t>
bool tile_epilogue(float* acc, int64_t ld_acc, out_t* dst, int64_t ld_dst, int64_t rows, int64_t cols, float s,
                   bool fresh, const c10::BFloat16* a_last, int64_t a_last_stride, const float* b_last) {
  using FVec = Vectorized<float>;
  const FVec scale(s);
  Vectorized<int32_t> max_bits(0);
  bool bad = false;
#if DSX_HAVE_AVX512_BF16_CONVERT
  const bool convert_whole_tile = std::is_same_v<out_t, c10::BFloat16> && cpu_has_avx512_bf16();
#else
  constexpr bool convert_whole_tile = false;
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float* row = acc + r * ld_acc;
    const FVec a_r(a_last != nullptr ? static_cast<float>(a_last[r * a_last_stride]) : 0.0f);
    for (int64_t x = 0; x < cols; x += FVec::size()) {
      const int count = static_cast<int>(std::min<int64_t>(FVec::size(), cols - x));
      FVec v = fresh ? FVec(0.0f) : FVec::loadu(row + x, count);
      if (a_last != nullptr) v = at::vec::fmadd(a_r, FVec::loadu(b_last + x, count), v);
      v = v * scale;
      v.store(row + x, count);
      if constexpr (std::is_same_v<out_t, float>) {
        max_bits = at::vec::maximum(max_bits, magnitude_bits_vec(v));  // lanes past count are 0
      }
    }
    if constexpr (!std::is_same_v<out_t, float>) {
      if (!convert_whole_tile) bad |= convert_check<out_t>(row, dst + r * ld_dst, cols);
    }
  }
#if DSX_HAVE_AVX512_BF16_CONVERT
  if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    if (convert_whole_tile) bad = convert_check_bf16_avx512(acc, ld_acc, dst, ld_dst, rows, cols);
  }
#endif
  if constexpr (std::is_same_v<out_t, float>) {
    bad = bits::max_magnitude_is_nonfinite<bits::Fp32Format>(max_lane<float>(max_bits));
  }
  return bad;
}

// out (out_t, M x N, contiguous) = out_t(s * (a @ b)) for bfloat16 a (M x K)
// and b (K x N) of any strides, K >= 1; returns whether any output value is
// inf/NaN. b is packed once; a is read in place when its rows are contiguous,
// else gathered once into rows.
template <typename out_t>
bool brgemm_bf16(const at::Tensor& a, const at::Tensor& b, float s, at::Tensor& out) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  // The packed layout holds pairs of rows of b; an odd last k is added in the
  // epilogue as a rank-1 update (its products are exact in float32).
  const int64_t K_even = K & ~int64_t{1};
  const int64_t m_tiles = (M + kTileM - 1) / kTileM, n_tiles = (N + kTileN - 1) / kTileN;
  const c10::BFloat16* a_ptr = a.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* b_ptr = b.const_data_ptr<c10::BFloat16>();
  const int64_t sa0 = a.stride(0), sa1 = a.stride(1), sb0 = b.stride(0), sb1 = b.stride(1);
  const bool a_in_place = sa1 == 1 && sa0 >= K;

  at::Tensor packed = empty_for_write({n_tiles, std::max<int64_t>(K_even, 1) * kTileN}, b.options());
  c10::BFloat16* packed_ptr = packed.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      pack_b_tile(b_ptr + j * kTileN * sb1, sb0, sb1, K_even, std::min(kTileN, N - j * kTileN),
                  packed_ptr + j * K_even * kTileN);
    }
  });
  at::Tensor b_last;
  if (K % 2 != 0) b_last = b.select(0, K - 1).to(at::kFloat).contiguous();
  const float* b_last_ptr = K % 2 != 0 ? b_last.const_data_ptr<float>() : nullptr;

  // a as row-major rows for the micro-kernel: in place when its rows are
  // contiguous, else gathered once (a transposed view, as in a weight gradient).
  const c10::BFloat16* a_rows = a_ptr;
  int64_t lda = sa0;
  at::Tensor a_gathered;
  if (!a_in_place && K_even > 0) {
    // Rows 64 bytes longer than K: with a power-of-two K the gather's writes,
    // one per row, would otherwise all fall in the same L1 set.
    lda = K_even + 32;
    a_gathered = empty_for_write({M, lda}, a.options());
    c10::BFloat16* dst = a_gathered.data_ptr<c10::BFloat16>();
    at::parallel_for(0, m_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        gather_a_rows(a_ptr + i * kTileM * sa0, sa0, sa1, std::min(kTileM, M - i * kTileM), K_even, lda,
                      dst + i * kTileM * lda);
      }
    });
    a_rows = dst;
  }

  // Work items: the column tiles in groups whose packed b fits in about
  // kPackedPanelBytes (L2), each group against every row tile. A thread walks
  // consecutive items: the row tiles of one group with its b panel in cache.
  // The groups are made small enough that every thread gets one.
  const int64_t tile_bytes = std::max<int64_t>(K_even, 1) * kTileN * int64_t{sizeof(c10::BFloat16)};
  int64_t group = std::clamp<int64_t>(kPackedPanelBytes / tile_bytes, 1, n_tiles);
  group = std::min(group, std::max<int64_t>(1, n_tiles / at::get_num_threads()));
  const int64_t n_groups = (n_tiles + group - 1) / group;

  out_t* out_ptr = out.data_ptr<out_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n_groups * m_tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc_tile[std::is_same_v<out_t, float> ? 1 : kTileM * kTileN];  // 16-bit outputs: the sums
    bool tile_bad = false;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / m_tiles, i = item % m_tiles, m0 = i * kTileM;
      const int64_t rows = std::min(kTileM, M - m0);
      for (int64_t j = g * group; j < std::min(n_tiles, (g + 1) * group); ++j) {
        const int64_t n0 = j * kTileN, cols = std::min(kTileN, N - n0);
        float* acc;
        int64_t ld_acc;
        if constexpr (std::is_same_v<out_t, float>) {
          acc = out_ptr + m0 * N + n0;
          ld_acc = N;
        } else {
          acc = acc_tile;
          ld_acc = kTileN;
        }
        if (K_even > 0) {
          at::native::cpublas::brgemm(rows, cols, K_even, lda, /*ld_b=*/kTileN, ld_acc, /*add_C=*/false,
                                      a_rows + m0 * lda, packed_ptr + j * K_even * kTileN, acc);
        }
        tile_bad |= tile_epilogue<out_t>(acc, ld_acc, out_ptr + m0 * N + n0, N, rows, cols, s,
                                         /*fresh=*/K_even == 0,
                                         b_last_ptr != nullptr ? a_ptr + m0 * sa0 + (K - 1) * sa1 : nullptr, sa0,
                                         b_last_ptr != nullptr ? b_last_ptr + n0 : nullptr);
      }
    }
    if (K_even > 0) at::native::cpublas::brgemm_release();
    if (tile_bad) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

// Rows per panel of a GEMM whose output rows take row_bytes: about
// kPanelBytes, so that the epilogue finds the panel in the last-level cache,
// unless the extra calls cost more. Each panel is one GEMM call, and a BLAS
// packs b again in each: about 8 bytes moved per element of b per extra call.
// Panels pay while that moves less than the pass over the float32 output (4
// bytes per element) that a cache-hot epilogue saves; with a deep K (a weight
// gradient over many tokens) one call and one pass cost less.
int64_t panel_rows(int64_t M, int64_t K, int64_t row_bytes) {
  const int64_t rows = std::clamp<int64_t>(kPanelBytes / std::max<int64_t>(row_bytes, 1), 1, M);
  const int64_t panels = (M + rows - 1) / rows;
  return (panels - 1) * K * 2 > M ? M : rows;
}

// float16 a and b to a float16 output on CPUs where torch's float16 GEMM is
// oneDNN's (AVX512-FP16): out = float16(s * (a @ b)) with float32
// accumulation and s applied to the float32 sums as alpha, one rounding to
// float16 (inf past 65504, RNE), then the float16 panel checked while in
// cache. No float32 copies of a and b, no float32 scratch. s is normal here.
bool native_fp16_panels(const at::Tensor& a, const at::Tensor& b, float s, at::Tensor& out) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const int64_t rows = panel_rows(M, K, N * int64_t{sizeof(float)});  // the float32 route's panels
  bool bad = false;
  for (int64_t r = 0; r < M; r += rows) {
    const int64_t h = std::min(rows, M - r);
    at::Tensor out_panel = out.narrow(0, r, h);  // rows of a contiguous matrix: contiguous
    at::addmm_out(out_panel, out_panel, a.narrow(0, r, h), b, /*beta=*/0, /*alpha=*/s);
    bad |= bits::max_magnitude_is_nonfinite<bits::Fp16Format>(
        parallel_max_magnitude_bits(out_panel.const_data_ptr<c10::Half>(), h * N));
  }
  return bad;
}

at::Tensor matmul_unscale_check_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                                    const at::Tensor& found_inf, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out_t = check_matmul_unscale_check_inputs(a, b, inv_scale, found_inf, out_dtype,
                                                                 c10::DeviceType::CPU);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = empty_for_write({M, N}, a.options().dtype(out_t));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();  // an empty sum: zeros, all finite

  const float s = *inv_scale.const_data_ptr<float>();
  if (a.scalar_type() == at::kBFloat16 && native_bf16_gemm()) {
    // s multiplies the float32 sums, never inside the micro-kernel: any s, even 0, is exact.
    const bool bad = out_t == at::kFloat ? brgemm_bf16<float>(a, b, s, out) : brgemm_bf16<c10::BFloat16>(a, b, s, out);
    if (bad) found_inf.fill_(1.0f);
    return out;
  }
  // beta = 0: the old contents of the output are never read (BLAS semantics).
  // A BLAS may skip a and b when alpha is 0, which would hide their inf/NaN,
  // so a scale that is not a normal float is applied after the GEMM.
  const bool alpha_in_gemm = std::isnormal(s);
  if (a.scalar_type() == at::kHalf && out_t == at::kHalf && alpha_in_gemm && native_fp16_gemm()) {
    if (native_fp16_panels(a, b, s, out)) found_inf.fill_(1.0f);
    return out;
  }
  const at::Tensor a32 = float32_for_blas(a), b32 = float32_for_blas(b);
  const auto gemm = [&](at::Tensor& acc, const at::Tensor& a_rows) {
    at::addmm_out(acc, acc, a_rows, b32, /*beta=*/0, /*alpha=*/alpha_in_gemm ? s : 1.0f);
    if (!alpha_in_gemm) acc.mul_(s);
  };

  const std::optional<bool> decided = out_t == at::kFloat && M * K + K * N < M * N
                                          ? nonfinite_from_inputs(a, b, s, K)
                                          : std::nullopt;
  bool bad = false;
  if (decided) {
    checks_from_inputs.fetch_add(1, std::memory_order_relaxed);
    gemm(out, a32);
    bad = *decided;
  } else {
    const int64_t rows = panel_rows(M, K, N * int64_t{sizeof(float)});
    at::Tensor scratch;  // float32 panel when the output is 16-bit
    if (out_t != at::kFloat) scratch = empty_for_write({rows, N}, a.options().dtype(at::kFloat));
    for (int64_t r = 0; r < M; r += rows) {
      const int64_t h = std::min(rows, M - r);
      at::Tensor out_panel = out.narrow(0, r, h);  // rows of a contiguous matrix: contiguous
      at::Tensor acc = out_t == at::kFloat ? out_panel : scratch.narrow(0, 0, h);
      gemm(acc, a32.narrow(0, r, h));  // a transposed a32: a strided view the BLAS reads as is
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

// Whether the brgemm route runs on this CPU: cpublas::could_pack(kBFloat16),
// which oneDNN answers yes only with AMX-BF16. AMX needs the process's
// permission to use tile state: asked for once here.
bool native_bf16_gemm() {
  static const bool available = [] {
    if (!at::native::cpublas::could_pack(at::kBFloat16)) return false;
    at::cpu::init_amx();
    return true;
  }();
  return available && runtime_options::cpu_bf16_gemm_allowed();
}

// Whether float16 inputs with a float16 output take torch's own float16 GEMM
// (oneDNN, on CPUs with AVX512-FP16, which every AMX-FP16 CPU also has, when
// torch's mkldnn backend is on) instead of float32 copies through the float32
// BLAS. DEEPSEEK_EXT_CPU_FP16_GEMM=0 keeps the float32 route
// (common/runtime_options.h).
bool native_fp16_gemm() {
#if defined(__GNUC__) && defined(__x86_64__) && (__GNUC__ >= 12 || defined(__clang__))
  static const bool available = __builtin_cpu_supports("avx512fp16");
#else
  static const bool available = false;
#endif
  return available && at::globalContext().userEnabledMkldnn() && runtime_options::cpu_fp16_gemm_allowed();
}

int64_t matmul_unscale_check_cpu_checks_from_inputs() { return checks_from_inputs.load(); }

}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("matmul_unscale_check", &deepseek_ext::ops::matmul_unscale_check_cpu);
}
