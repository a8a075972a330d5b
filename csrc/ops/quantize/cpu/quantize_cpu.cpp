// int8 gradient quantisation on the CPU.
//
// quantize_int8 / quantize_int8_ef_: at::parallel_for over quantisation
// blocks. Each block is read once from memory (x, and the residual for error
// feedback) into a float buffer on the stack while its absmax is taken on the
// raw bits; q (and the new residual) are then computed from that buffer (L1)
// and written once. Stochastic rounding draws its words with an AVX2 Philox
// (8 counter blocks per step) into a second buffer.
// dequantize_reduce_int8 (and dequantize_int8, its W = 1 case): at::parallel_for
// over 32-element groups, all ranks' q of a group accumulated in registers.
//
// Every operation matches the scalar definitions of detail/int8_quant.h
// (which the scalar tails call directly): IEEE division, rint / floor, and
// explicit fused multiply-adds, so the results equal the CUDA kernels' bit for bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "common/cpu_alloc.h"
#include "common/runtime_options.h"
#include "deepseek_ext/detail/int8_quant.h"
#include "deepseek_ext/detail/philox.h"
#include "quantize/quantize.h"

namespace deepseek_ext {
namespace ops {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;
using IVec = Vectorized<int32_t>;
static_assert(FVec::size() == 8 && IVec::size() == 8, "kernels assume 8 float lanes");

// Elements per parallel_for task, roughly.
constexpr int64_t kGrainElems = int64_t{1} << 16;
constexpr int64_t kMaxBlock = int8q::kMaxBlockSize;

// ---- 16 values of T <-> two float vectors ----
template <typename T>
inline void load16(const T* p, FVec& a, FVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = FVec::loadu(p);
    b = FVec::loadu(p + 8);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store16(T* p, const FVec& a, const FVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + 8);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// 32 integral floats in [-127, 127] -> 32 int8.
inline void store_q32(int8_t* dst, const FVec (&r)[4]) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i a = _mm256_cvtps_epi32(r[0]);
  const __m256i b = _mm256_cvtps_epi32(r[1]);
  const __m256i c = _mm256_cvtps_epi32(r[2]);
  const __m256i d = _mm256_cvtps_epi32(r[3]);
  // packs work per 128-bit lane: dwords come out as a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), ordered);
#else
  float tmp[32];
  for (int k = 0; k < 4; ++k) r[k].store(tmp + 8 * k);
  for (int i = 0; i < 32; ++i) dst[i] = static_cast<int8_t>(tmp[i]);
#endif
}

// 8 int8 -> 8 floats.
inline FVec load_q8(const int8_t* src) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
  return FVec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
#else
  float tmp[8];
  for (int i = 0; i < 8; ++i) tmp[i] = static_cast<float>(src[i]);
  return FVec::loadu(tmp);
#endif
}

// Uniforms of 8 random words (int8q::uniform_from_word, lane by lane).
inline FVec uniform8(const uint32_t* w) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i top = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)),
                                        int8q::kUniformShift);
  return FVec(_mm256_mul_ps(_mm256_cvtepi32_ps(top), _mm256_set1_ps(int8q::kTwoPowMinus23)));
#else
  float tmp[8];
  for (int i = 0; i < 8; ++i) tmp[i] = int8q::uniform_from_word(w[i]);
  return FVec::loadu(tmp);
#endif
}

// y - q * scale with one rounding (int8q::residual).
inline FVec residual8(const FVec& y, const FVec& q, const FVec& scale) {
#if defined(CPU_CAPABILITY_AVX2)
  return FVec(_mm256_fnmadd_ps(q, scale, y));
#else
  float ty[8], tq[8], ts[8];
  y.store(ty);
  q.store(tq);
  scale.store(ts);
  for (int i = 0; i < 8; ++i) ty[i] = int8q::residual(ty[i], tq[i], ts[i]);
  return FVec::loadu(ty);
#endif
}

// acc + q * scale with one rounding (int8q::accumulate).
inline FVec accumulate8(const FVec& acc, const FVec& q, const FVec& scale) {
#if defined(CPU_CAPABILITY_AVX2)
  return FVec(_mm256_fmadd_ps(q, scale, acc));
#else
  float ta[8], tq[8], ts[8];
  acc.store(ta);
  q.store(tq);
  scale.store(ts);
  for (int i = 0; i < 8; ++i) ta[i] = int8q::accumulate(ta[i], tq[i], ts[i]);
  return FVec::loadu(ta);
#endif
}

#if defined(CPU_CAPABILITY_AVX2)
// Products of the 8 lanes of c with m: low and high 32 bits.
inline void mulhilo8(__m256i c, __m256i m, __m256i& lo, __m256i& hi) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// Philox4x32-10 of 8 counter blocks at once: lane l of c0..c3 holds counter
// block l's words on entry and its output words on return. kw0 / kw1: the
// round keys.
inline void philox8(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, const __m256i* kw0,
                    const __m256i* kw1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kMul1));
  for (int r = 0; r < philox::kRounds; ++r) {
    __m256i lo0, hi0, lo1, hi1;
    mulhilo8(c0, m0, lo0, hi0);
    mulhilo8(c2, m1, lo1, hi1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), kw0[r]);
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), kw1[r]);
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
}

// Stores the words of 8 counter blocks (lane l of c_j = word j of block l) as
// 32 consecutive words, block by block.
inline void store_blocks8(uint32_t* words, __m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i t01lo = _mm256_unpacklo_epi32(c0, c1);  // blocks 0,1 | 4,5: w0 w1
  const __m256i t01hi = _mm256_unpackhi_epi32(c0, c1);  // blocks 2,3 | 6,7
  const __m256i t23lo = _mm256_unpacklo_epi32(c2, c3);
  const __m256i t23hi = _mm256_unpackhi_epi32(c2, c3);
  const __m256i b04 = _mm256_unpacklo_epi64(t01lo, t23lo);  // block 0 | block 4
  const __m256i b15 = _mm256_unpackhi_epi64(t01lo, t23lo);  // block 1 | block 5
  const __m256i b26 = _mm256_unpacklo_epi64(t01hi, t23hi);
  const __m256i b37 = _mm256_unpackhi_epi64(t01hi, t23hi);
  auto* out = reinterpret_cast<__m256i*>(words);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(b04, b15, 0x20));  // blocks 0, 1
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(b26, b37, 0x20));  // blocks 2, 3
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(b04, b15, 0x31));  // blocks 4, 5
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(b26, b37, 0x31));  // blocks 6, 7
}

// Counter words 0 and 1 (low and high half of the 64-bit block index) of
// blocks first .. first + 7, built in registers (scalar stores followed by a
// vector load would stall on store forwarding).
inline void counters8(uint64_t first, __m256i& c0, __m256i& c1) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const auto lo = static_cast<uint32_t>(first);
  const auto hi = static_cast<uint32_t>(first >> 32);
  c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), iota);
  // A lane wrapped past 2^32 iff its low word is now below lo (unsigned):
  // compare with the sign bits flipped; the all-ones mask is -1, so subtract it.
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i wrapped = _mm256_cmpgt_epi32(
      _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(lo)), flip), _mm256_xor_si256(c0, flip));
  c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(hi)), wrapped);
}
#endif

// words[4 * k + j] = word j of Philox counter block first + k, k < count
// (philox::philox_block): the random words of element indices
// [4 * first, 4 * (first + count)). AVX2 (or scalar) version.
void philox_words_avx2(uint64_t seed, uint64_t first, int64_t count, uint32_t* words) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if (count >= 8) {
    __m256i kw0[philox::kRounds], kw1[philox::kRounds];
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      kw0[r] = _mm256_set1_epi32(static_cast<int>(k0));
      kw1[r] = _mm256_set1_epi32(static_cast<int>(k1));
      k0 += philox::kWeyl0;
      k1 += philox::kWeyl1;
    }
    // Two independent groups of 8 blocks per step: the rounds are a chain of
    // multiplies, so two chains in flight keep the multipliers busy.
    for (; k + 16 <= count; k += 16) {
      __m256i a0, a1, b0, b1;
      counters8(first + static_cast<uint64_t>(k), a0, a1);
      counters8(first + static_cast<uint64_t>(k + 8), b0, b1);
      __m256i a2 = _mm256_setzero_si256(), a3 = a2, b2 = a2, b3 = a2;
      const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kMul0));
      const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kMul1));
      for (int r = 0; r < philox::kRounds; ++r) {
        __m256i alo0, ahi0, alo1, ahi1, blo0, bhi0, blo1, bhi1;
        mulhilo8(a0, m0, alo0, ahi0);
        mulhilo8(b0, m0, blo0, bhi0);
        mulhilo8(a2, m1, alo1, ahi1);
        mulhilo8(b2, m1, blo1, bhi1);
        a0 = _mm256_xor_si256(_mm256_xor_si256(ahi1, a1), kw0[r]);
        b0 = _mm256_xor_si256(_mm256_xor_si256(bhi1, b1), kw0[r]);
        a2 = _mm256_xor_si256(_mm256_xor_si256(ahi0, a3), kw1[r]);
        b2 = _mm256_xor_si256(_mm256_xor_si256(bhi0, b3), kw1[r]);
        a1 = alo1;
        b1 = blo1;
        a3 = alo0;
        b3 = blo0;
      }
      store_blocks8(words + 4 * k, a0, a1, a2, a3);
      store_blocks8(words + 4 * (k + 8), b0, b1, b2, b3);
    }
    for (; k + 8 <= count; k += 8) {
      __m256i c0, c1;
      counters8(first + static_cast<uint64_t>(k), c0, c1);
      __m256i c2 = _mm256_setzero_si256(), c3 = c2;
      philox8(c0, c1, c2, c3, kw0, kw1);
      store_blocks8(words + 4 * k, c0, c1, c2, c3);
    }
  }  // count >= 8
#endif
  for (; k < count; ++k) {
    const philox::Words w = philox::philox_block(seed, first + static_cast<uint64_t>(k));
    std::memcpy(words + 4 * k, w.w, sizeof w.w);
  }
}

#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__) && defined(__x86_64__)
#define DSX_HAVE_AVX512_PHILOX 1
// The same words with AVX-512F, used when the CPU has it (the build targets
// AVX2; this one function is compiled for AVX-512F and chosen at run time).
// Each 64-bit lane holds one counter block, its 32-bit words in the low
// halves: one vpmuludq then gives the full 64-bit product (lo in the low half,
// hi after swapping halves). The high halves collect garbage that never
// reaches a low half (vpmuludq reads only low halves; the swap moves a high
// half down only from a fresh product). Four independent groups of 8 blocks hide the multiply latency.
__attribute__((target("avx512f"))) void philox_words_avx512(uint64_t seed, uint64_t first,
                                                            int64_t count, uint32_t* words) {
  constexpr int kGroups = 4;
  const __m512i m0 = _mm512_set1_epi64(philox::kMul0);
  const __m512i m1 = _mm512_set1_epi64(philox::kMul1);
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i kw0[philox::kRounds], kw1[philox::kRounds];
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < philox::kRounds; ++r) {
    kw0[r] = _mm512_set1_epi64(k0);
    kw1[r] = _mm512_set1_epi64(k1);
    k0 += philox::kWeyl0;
    k1 += philox::kWeyl1;
  }
  const __m512i low32 = _mm512_set1_epi64(0xffffffffLL);
  int64_t k = 0;
  for (; k + 8 * kGroups <= count; k += 8 * kGroups) {
    __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      const __m512i idx = _mm512_add_epi64(
          _mm512_set1_epi64(static_cast<long long>(first + static_cast<uint64_t>(k + 8 * g))), iota);
      c0[g] = _mm512_and_si512(idx, low32);
      c1[g] = _mm512_srli_epi64(idx, 32);
      c2[g] = _mm512_setzero_si512();
      c3[g] = _mm512_setzero_si512();
    }
    for (int r = 0; r < philox::kRounds; ++r) {
      for (int g = 0; g < kGroups; ++g) {
        const __m512i p0 = _mm512_mul_epu32(c0[g], m0);
        const __m512i p1 = _mm512_mul_epu32(c2[g], m1);
        // hi: swap the 32-bit halves (a shuffle, off the multiplier's port;
        // the high half it leaves behind is garbage, see above). 0x96: a ^ b ^ c.
        const __m512i hi0 = _mm512_shuffle_epi32(p0, _MM_PERM_CDAB);
        const __m512i hi1 = _mm512_shuffle_epi32(p1, _MM_PERM_CDAB);
        c0[g] = _mm512_ternarylogic_epi64(hi1, c1[g], kw0[r], 0x96);
        c2[g] = _mm512_ternarylogic_epi64(hi0, c3[g], kw1[r], 0x96);
        c1[g] = p1;
        c3[g] = p0;
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      store_blocks8(words + 4 * (k + 8 * g), _mm512_cvtepi64_epi32(c0[g]),
                    _mm512_cvtepi64_epi32(c1[g]), _mm512_cvtepi64_epi32(c2[g]),
                    _mm512_cvtepi64_epi32(c3[g]));
    }
  }
  philox_words_avx2(seed, first + static_cast<uint64_t>(k), count - k, words + 4 * k);
}
#endif

// The best philox_words for this CPU. DEEPSEEK_EXT_DISABLE_AVX512
// (common/runtime_options.h) forces the AVX2 path, to test it on an AVX-512 machine.
void philox_words(uint64_t seed, uint64_t first, int64_t count, uint32_t* words) {
#if defined(DSX_HAVE_AVX512_PHILOX)
  static const bool use_avx512 = __builtin_cpu_supports("avx512f") && !runtime_options::avx512_disabled();
  if (use_avx512) return philox_words_avx512(seed, first, count, words);
#endif
  philox_words_avx2(seed, first, count, words);
}

struct QuantArgs {
  int64_t block_size;
  bool stochastic;
  uint64_t seed;
  uint64_t offset;
};

// Quantises x[0, n) (+ residual, when kEF) block by block into q and scales;
// with kEF also writes the new residual.
template <typename scalar_t, typename res_t, bool kEF>
void quantize_kernel(const scalar_t* x, res_t* res, int8_t* q, float* scales, int64_t n,
                     const QuantArgs& args) {
  const int64_t bs = args.block_size;
  const int64_t nblocks = num_quant_blocks(n, bs);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / bs);
  at::parallel_for(0, nblocks, grain, [&](int64_t b_begin, int64_t b_end) {
    alignas(64) float ybuf[kMaxBlock];
    alignas(64) uint32_t words[kMaxBlock + 8];
    const IVec mag_mask(static_cast<int32_t>(int8q::kMagnitudeMask));
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t e0 = b * bs;
      const int64_t len = std::min(bs, n - e0);
      const scalar_t* xb = x + e0;
      res_t* rb = kEF ? res + e0 : nullptr;

      // Pass 1: y = x (+ residual) in float, and the largest magnitude bits.
      constexpr bool kDirect = std::is_same_v<scalar_t, float> && !kEF;
      const float* y = kDirect ? reinterpret_cast<const float*>(xb) : ybuf;
      IVec acc(0);
      int64_t i = 0;
      for (; i + 16 <= len; i += 16) {
        FVec a, c;
        load16(xb + i, a, c);
        if constexpr (kEF) {
          FVec ra, rc;
          load16(rb + i, ra, rc);
          a = a + ra;
          c = c + rc;
        }
        if constexpr (!kDirect) {
          a.store(ybuf + i);
          c.store(ybuf + i + 8);
        }
        acc = at::vec::maximum(acc, at::vec::cast<int32_t>(a) & mag_mask);
        acc = at::vec::maximum(acc, at::vec::cast<int32_t>(c) & mag_mask);
      }
      int32_t lanes[8];
      acc.store(lanes);
      uint32_t amax = 0;
      for (int l = 0; l < 8; ++l) amax = std::max(amax, static_cast<uint32_t>(lanes[l]));
      for (; i < len; ++i) {
        float v = static_cast<float>(xb[i]);
        if constexpr (kEF) v = int8q::add_rn(v, static_cast<float>(rb[i]));
        if constexpr (!kDirect) ybuf[i] = v;
        amax = std::max(amax, int8q::magnitude_bits(v));
      }

      const float scale = int8q::scale_from_absmax_bits(amax);
      scales[b] = scale;
      int8_t* qb = q + e0;
      if (!int8q::quantizes(scale)) {
        std::memset(qb, 0, static_cast<size_t>(len));
        // Zero scale: q = 0, residual = y. Non-finite: residual left as it was.
        if constexpr (kEF) {
          if (scale == 0.0f) {
            for (i = 0; i + 16 <= len; i += 16) {
              store16(rb + i, FVec::loadu(y + i), FVec::loadu(y + i + 8));
            }
            for (; i < len; ++i) rb[i] = static_cast<res_t>(y[i]);
          }
        }
        continue;
      }

      // Pass 2 (from L1): q, and the residual.
      const FVec sv(scale);
      // Stochastic rounding's quotient (int8q::sr_quotient): y * RN(1 / scale)
      // in the usual range of scales, y / scale outside it.
      const bool sr_mul = args.stochastic && int8q::sr_by_reciprocal(scale);
      const FVec inv(int8q::scale_divisor(scale).inv);
      const FVec lo(-int8q::kQMax), hi(int8q::kQMax), one(1.0f), zero(0.0f);
      const uint64_t g0 = args.offset + static_cast<uint64_t>(e0);  // index of element 0
      const uint32_t* u_words = nullptr;
      if (args.stochastic) {
        const uint64_t first = g0 >> 2;
        const uint64_t last = (g0 + static_cast<uint64_t>(len) - 1) >> 2;
        philox_words(args.seed, first, static_cast<int64_t>(last - first + 1), words);
        u_words = words + (g0 & 3);  // u_words[j]: the word of element j
      }
      for (i = 0; i + 32 <= len; i += 32) {
        FVec r[4];
        for (int k = 0; k < 4; ++k) {
          const FVec yv = FVec::loadu(y + i + 8 * k);
          const FVec v = sr_mul ? yv * inv : yv / sv;
          FVec qv;
          if (args.stochastic) {
            const FVec f = v.floor();
            const FVec frac = v - f;
            qv = f + ((uniform8(u_words + i + 8 * k) < frac) & one);
          } else {
            qv = v.round();
          }
          // + 0: q = 0 is +0, never -0 (int8_quant.h: the residual uses the int8's value).
          r[k] = at::vec::clamp(qv, lo, hi) + zero;
          if constexpr (kEF) {
            const FVec e = residual8(yv, r[k], sv);
            if constexpr (std::is_same_v<res_t, float>) {
              e.store(rb + i + 8 * k);
            } else {
              // ybuf[i + 8k, +8) has been read: it holds the float residual
              // until it is converted 16 at a time below.
              e.store(ybuf + i + 8 * k);
            }
          }
        }
        if constexpr (kEF && !std::is_same_v<res_t, float>) {
          store16(rb + i, FVec::loadu(ybuf + i), FVec::loadu(ybuf + i + 8));
          store16(rb + i + 16, FVec::loadu(ybuf + i + 16), FVec::loadu(ybuf + i + 24));
        }
        store_q32(qb + i, r);
      }
      for (; i < len; ++i) {
        const float qf = args.stochastic ? int8q::quantize_sr(y[i], scale, u_words[i])
                                         : int8q::quantize_rne(y[i], scale);
        qb[i] = static_cast<int8_t>(qf);
        if constexpr (kEF) rb[i] = static_cast<res_t>(int8q::residual(y[i], qf, scale));
      }
    }
  });
}

template <typename scalar_t>
void dispatch_quantize(const at::Tensor& x, const at::Tensor& residual, at::Tensor& q,
                       at::Tensor& scales, const QuantArgs& args) {
  const auto* xp = x.const_data_ptr<scalar_t>();
  auto* qp = q.mutable_data_ptr<int8_t>();
  auto* sp = scales.mutable_data_ptr<float>();
  const int64_t n = x.numel();
  if (!residual.defined()) {
    quantize_kernel<scalar_t, float, false>(xp, nullptr, qp, sp, n, args);
  } else if (residual.scalar_type() == at::kFloat) {
    quantize_kernel<scalar_t, float, true>(xp, residual.mutable_data_ptr<float>(), qp, sp, n, args);
  } else {
    quantize_kernel<scalar_t, c10::BFloat16, true>(
        xp, residual.mutable_data_ptr<c10::BFloat16>(), qp, sp, n, args);
  }
}

// q and scales of x (+ residual, updated in place, when defined).
std::tuple<at::Tensor, at::Tensor> quantize_impl(const at::Tensor& x_in, const at::Tensor& res_in,
                                                 int64_t block_size, bool stochastic, int64_t seed,
                                                 int64_t offset) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = empty_for_write(x_in.sizes(), x_in.options().dtype(at::kChar));
  at::Tensor scales =
      at::empty({num_quant_blocks(x.numel(), block_size)}, x_in.options().dtype(at::kFloat));
  if (x.numel() == 0) return {q, scales};
  at::Tensor residual = res_in.defined() ? res_in.contiguous() : at::Tensor();
  const QuantArgs args{block_size, stochastic, static_cast<uint64_t>(seed),
                       static_cast<uint64_t>(offset)};
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_quantize<float>(x, residual, q, scales, args); break;
    case at::kHalf: dispatch_quantize<c10::Half>(x, residual, q, scales, args); break;
    case at::kBFloat16: dispatch_quantize<c10::BFloat16>(x, residual, q, scales, args); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", x.scalar_type());
  }
  if (residual.defined() && !residual.is_same(res_in)) res_in.copy_(residual);
  return {q, scales};
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x, int64_t block_size,
                                                     bool stochastic, int64_t seed,
                                                     int64_t offset) {
  check_quantize_inputs(x, block_size, offset, c10::DeviceType::CPU);
  return quantize_impl(x, at::Tensor(), block_size, stochastic, seed, offset);
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_ef_cpu(const at::Tensor& x,
                                                        const at::Tensor& residual,
                                                        int64_t block_size, bool stochastic,
                                                        int64_t seed, int64_t offset) {
  check_quantize_ef_inputs(x, residual, block_size, offset, c10::DeviceType::CPU);
  return quantize_impl(x, residual, block_size, stochastic, seed, offset);
}

// out[i] = multiplier * sum_w q[w][i] * scales[w][i / bs] for q [W, n].
template <typename out_t>
void dequantize_reduce_kernel(const int8_t* q, const float* scales, out_t* out, int64_t W,
                              int64_t n, int64_t bs, float multiplier) {
  const int64_t nblocks = num_quant_blocks(n, bs);
  const int64_t ngroups = (n + 31) / 32;
  at::parallel_for(0, ngroups, kGrainElems / 32, [&](int64_t g_begin, int64_t g_end) {
    const FVec mv(multiplier);
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t e0 = g * 32;
      const int64_t blk = e0 / bs;  // bs % 32 == 0: a group lies in one block
      if (e0 + 32 <= n) {
        FVec acc[4] = {FVec(0.0f), FVec(0.0f), FVec(0.0f), FVec(0.0f)};
        for (int64_t w = 0; w < W; ++w) {
          const int8_t* qw = q + w * n + e0;
          const FVec sv(scales[w * nblocks + blk]);
          for (int k = 0; k < 4; ++k) acc[k] = accumulate8(acc[k], load_q8(qw + 8 * k), sv);
        }
        store16(out + e0, mv * acc[0], mv * acc[1]);
        store16(out + e0 + 16, mv * acc[2], mv * acc[3]);
      } else {
        for (int64_t i = e0; i < n; ++i) {
          float acc = 0.0f;
          for (int64_t w = 0; w < W; ++w) {
            acc = int8q::accumulate(acc, static_cast<float>(q[w * n + i]), scales[w * nblocks + blk]);
          }
          out[i] = static_cast<out_t>(int8q::mul_rn(multiplier, acc));
        }
      }
    }
  });
}

at::Tensor dequantize_reduce_impl(const at::Tensor& q_in, const at::Tensor& scales_in,
                                  int64_t block_size, double multiplier, at::ScalarType dtype) {
  const at::Tensor q = q_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const int64_t W = q.size(0);
  const int64_t n = q.size(1);
  at::Tensor out = empty_for_write({n}, q.options().dtype(dtype));
  if (n == 0) return out;
  const float m = static_cast<float>(multiplier);
  const auto* qp = q.const_data_ptr<int8_t>();
  const auto* sp = scales.const_data_ptr<float>();
  switch (dtype) {
    case at::kFloat:
      dequantize_reduce_kernel<float>(qp, sp, out.mutable_data_ptr<float>(), W, n, block_size, m);
      break;
    case at::kHalf:
      dequantize_reduce_kernel<c10::Half>(qp, sp, out.mutable_data_ptr<c10::Half>(), W, n,
                                          block_size, m);
      break;
    case at::kBFloat16:
      dequantize_reduce_kernel<c10::BFloat16>(qp, sp, out.mutable_data_ptr<c10::BFloat16>(), W, n,
                                              block_size, m);
      break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", dtype);
  }
  return out;
}

at::Tensor dequantize_reduce_int8_cpu(const at::Tensor& q, const at::Tensor& scales,
                                      int64_t block_size, double multiplier,
                                      at::ScalarType dtype) {
  check_dequantize_reduce_inputs(q, scales, block_size, dtype, c10::DeviceType::CPU);
  return dequantize_reduce_impl(q, scales, block_size, multiplier, dtype);
}

// The W = 1, multiplier = 1 case of the reduction: fma(q, scale, 0) * 1 is
// exactly q * scale (q = 0 whenever scale is 0, so no -0 differs).
at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                               at::ScalarType dtype, int64_t numel) {
  check_dequantize_inputs(q, scales, block_size, dtype, numel, c10::DeviceType::CPU);
  return dequantize_reduce_impl(q.reshape({1, numel}), scales.reshape({1, scales.numel()}),
                                block_size, 1.0, dtype)
      .view(q.sizes());
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("quantize_int8", &deepseek_ext::ops::quantize_int8_cpu);
  m.impl("quantize_int8_ef_", &deepseek_ext::ops::quantize_int8_ef_cpu);
  m.impl("dequantize_int8", &deepseek_ext::ops::dequantize_int8_cpu);
  m.impl("dequantize_reduce_int8", &deepseek_ext::ops::dequantize_reduce_int8_cpu);
}
