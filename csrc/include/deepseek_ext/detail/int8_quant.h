#pragma once
// Blockwise int8 quantisation math, the single definition used by the CPU and
// the CUDA kernels (and by the C++ tests as the reference).
//
// A block of values y gets scale = absmax(y) / 127 (float32) and
// q = round(y / scale) in [-127, 127]:
//   * round-to-nearest-even: q = rint(y / scale);
//   * stochastic: with v = RN(y * RN(1 / scale)) (one multiplication per
//     value; y / scale for the rare scales outside [2^-90, 2^90]), f = floor(v)
//     and u = k * 2^-23 from the top 23 bits k of one Philox word,
//     q = f + (u < v - f). v - f is exact (but for v in (-1, 0): see
//     sr_code), so P(q = f + 1) = ceil((v - f) * 2^23) / 2^23, and
//     E[q] * scale = v * scale =
//     y * (1 + d) with |d| < 2^-22 (the two roundings of v, when it is a
//     normal float): unbiased to float32 precision, plus less than 2^-23 of
//     a quantisation step.
//   * a block of zeros has scale 0 and q 0; a block whose absmax underflows
//     scale to 0 (|y| < 127 * 2^-149) is sent as zeros too;
//   * a block holding inf or NaN has scale NaN and q 0, so that its
//     dequantised values are NaN: non-finite gradients stay visible.
//   * q is clamped to [-127, 127] (scale's rounding can put |y / scale| a
//     little above 127).
// Dequantisation is q * scale; error feedback keeps y - q * scale computed as
// one fused multiply-add (fma(-q, scale, y), q the int8's value: +0, never -0,
// so a zero q leaves the residual y bit for bit), a reduction over ranks
// accumulates acc = fma(q, scale, acc) in rank order.
//
// Bit identity between the host and the device rests on using only correctly
// rounded IEEE operations (division, multiplication, addition, fma, floor) that
// the compilers may not reshape: device code calls the _rn intrinsics (never
// contracted), host code writes every multiply-add as an explicit fma and is
// built without -ffast-math. absmax is taken on the raw bits, so NaN ordering
// and fast-math do not matter.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "deepseek_ext/detail/macros.h"

namespace deepseek_ext {
namespace int8q {

constexpr int64_t kBlockMultiple = 32;   // block_size is a multiple of this
constexpr int64_t kMaxBlockSize = 4096;  // and at most this
constexpr float kQMax = 127.0f;
constexpr uint32_t kMagnitudeMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr uint32_t kQuietNaNBits = 0x7fc00000u;

DSX_INLINE float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

DSX_INLINE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// |x| as bits: the maximum of these over a block orders like |x| for finite
// values and is >= kInfBits exactly when the block holds an inf or NaN.
DSX_INLINE uint32_t magnitude_bits(float x) { return float_to_bits(x) & kMagnitudeMask; }

// Correctly rounded operations that no compiler turns into something else.
DSX_INLINE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DSX_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DSX_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DSX_INLINE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DSX_INLINE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
DSX_INLINE float floor_f(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  return std::floor(x);
#endif
}

// The scale of a block from the largest magnitude_bits() of its values.
DSX_INLINE float scale_from_absmax_bits(uint32_t absmax_bits) {
  if (absmax_bits >= kInfBits) return bits_to_float(kQuietNaNBits);
  return div_rn(bits_to_float(absmax_bits), kQMax);
}

// Whether values of a block with this scale are quantised (false for the
// zero scale of an all-zero / underflowing block and the NaN of a non-finite one).
DSX_INLINE bool quantizes(float scale) { return scale > 0.0f; }

// r clamped to [-127, 127] (r is never NaN here: it is a quotient of finite
// values by a positive finite scale). On the device two FMNMX instructions.
DSX_INLINE float clamp_q(float r) {
#if defined(__CUDA_ARCH__)
  return fmaxf(fminf(r, kQMax), -kQMax);
#else
  return r < -kQMax ? -kQMax : (r > kQMax ? kQMax : r);
#endif
}

// Uniform u = k * 2^-23 in [0, 1) from the top 23 bits k of a random word
// (exact in float).
constexpr int kUniformShift = 9;
constexpr float kTwoPow23 = 8388608.0f;
constexpr float kTwoPowMinus23 = 1.1920928955078125e-07f;
DSX_INLINE float uniform_from_word(uint32_t word) {
  return mul_rn(static_cast<float>(word >> kUniformShift), kTwoPowMinus23);
}

// q codes. The int8 q of a quotient v is carried as the float
// t = q + 1.5 * 2^23, which is exact for |q| <= 2^22: the low byte of t's bits
// is q in two's complement (code_byte), and t - 1.5 * 2^23 is q as a float,
// +0 for q = 0, never -0 (code_value). Adding 1.5 * 2^23 rounds v to the float
// grid there, whose spacing is 1: to nearest even that is rint(v), toward -inf
// it is floor(v). On the device this replaces rint (FRND) and the float-to-int
// conversion (F2I), both quarter-rate instructions, by one FADD, and packing is
// a byte permute. The error-feedback residual y - q * scale uses code_value, so
// a zero q never carries a sign: y = -0 keeps residual -0 on both paths.
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

DSX_INLINE float code_value(float t) { return sub_rn(t, kRoundMagic); }
DSX_INLINE int8_t code_byte(float t) {
  return static_cast<int8_t>(static_cast<uint8_t>(float_to_bits(t) & 0xffu));
}

// The code of rint(clamp_q(v)) (round to nearest, ties to even).
DSX_INLINE float rne_code(float v) { return add_rn(clamp_q(v), kRoundMagic); }

// The code of floor(v), for |v| <= 127.
DSX_INLINE float floor_code(float v) {
#if defined(__CUDA_ARCH__)
  return __fadd_rd(v, kRoundMagic);
#else
  return add_rn(floor_f(v), kRoundMagic);
#endif
}

// The code of a quotient v (sr_quotient) rounded stochastically with the
// random word `word`: with vc = clamp_q(v), f = floor(vc), frac = RN(vc - f)
// and u uniform in [0, 1) from the word (uniform_from_word),
// q = f + (u < frac). frac is exact except for vc in (-1, 0), where 1 + vc
// can need more bits than a float has and is rounded once. Clamping before
// rounding gives what clamping after it would: the bounds are integers.
//
// The device decides u < frac without converting k to float (a quarter-rate
// instruction): RU(frac * 2^23 + 2^23) (one fma rounding up; the spacing of
// floats on [2^23, 2^24] is 1) is 2^23 + ceil(frac * 2^23), the float 2^23 + k
// has the bits 0x4b000000 + k, positive floats order as their bits, and for an
// integer k, k < ceil(frac * 2^23) exactly when k * 2^-23 < frac.
constexpr uint32_t kTwoPow23Bits = 0x4b000000u;

// Given sum = RU(frac * 2^23 + 2^23), whether u < frac. (The C++ tests
// evaluate this form on the host, rounding upward, against the host's.)
DSX_INLINE bool rounds_up_by_bits(uint32_t word, float sum) {
  return (word >> kUniformShift) + kTwoPow23Bits < float_to_bits(sum);
}

DSX_INLINE float sr_code(float v, uint32_t word) {
  const float vc = clamp_q(v);
  const float t = floor_code(vc);
  const float frac = sub_rn(vc, code_value(t));
#if defined(__CUDA_ARCH__)
  const bool up = rounds_up_by_bits(word, __fmaf_ru(frac, kTwoPow23, kTwoPow23));
#else
  const bool up = uniform_from_word(word) < frac;
#endif
  return up ? add_rn(t, 1.0f) : t;
}

// q (as an integral float in [-127, 127], +0 for zero) of y with round-to-nearest-even.
DSX_INLINE float quantize_rne(float y, float scale) {
  if (!quantizes(scale)) return 0.0f;
  return code_value(rne_code(div_rn(y, scale)));
}

// Round-to-nearest-even q without a division per element. A block divides
// every value by the same scale s, so take r = RN(1/s) once; then
// q0 = RN(y r), e = y - q0 s (exact: one fma) and RN(q0 + e r) is the
// correctly rounded y / s (Markstein's theorem: r correctly rounded, no
// underflow or overflow). e == 0 means q0 is exact; returning it also keeps
// the sign of a zero y. With 2^-90 <= s <= 2^90 (rne_by_reciprocal) and
// |y| <= 127.5 s, the quotient cannot overflow, and wherever rint could round
// it either way (|y / s| >= 0.5) nothing underflows, so rint gives the same q
// as quantize_rne. Below 0.5 both give 0, and the residual y - q s is y either
// way. (Stochastic rounding sees tiny quotients; it keeps the division.)
// The tests compare both with the division bit for bit. The CUDA quantize
// kernel divides this way (a division per value is a reciprocal, fmas, a
// range check and a branch to a slow path); the CPU kernels keep the vector
// division, which is cheaper there than this sequence.
struct ScaleDivisor {
  float scale;
  float inv;  // RN(1 / scale)
};

DSX_INLINE ScaleDivisor scale_divisor(float scale) { return {scale, div_rn(1.0f, scale)}; }

constexpr uint32_t kReciprocalMinExponent = 127 - 90;  // biased exponent of 2^-90
constexpr uint32_t kReciprocalMaxExponent = 127 + 90;

// Whether quantize_rne_by(y, scale_divisor(scale)) == quantize_rne(y, scale)
// for every y of a block with this scale.
DSX_INLINE bool rne_by_reciprocal(float scale) {
  const uint32_t e = (float_to_bits(scale) & kMagnitudeMask) >> 23;
  return e >= kReciprocalMinExponent && e <= kReciprocalMaxExponent;
}

DSX_INLINE float div_by(float y, ScaleDivisor d) {
  const float q0 = mul_rn(y, d.inv);
  const float e = fma_rn(-q0, d.scale, y);
  return e == 0.0f ? q0 : fma_rn(e, d.inv, q0);
}

DSX_INLINE float quantize_rne_by(float y, ScaleDivisor d) {
  return code_value(rne_code(div_by(y, d)));
}

// The quotient that stochastic rounding rounds: y * RN(1 / scale), one
// multiplication, where sr_by_reciprocal(scale) (2^-90 <= scale <= 2^90: the
// reciprocal is a normal float far from overflow; every block of values
// between about 2^-83 and 2^97 in magnitude), else the correctly rounded
// y / scale. Not the correctly rounded quotient: it differs from y / scale by
// less than 2^-22 relative, and the rounding's expectation is this value (see
// the top of this file), so the error is float32 rounding, not a bias of the
// quantiser. A multiplication instead of a division per value because
// stochastic rounding on the GPU is bound by instructions per value.
DSX_INLINE bool sr_by_reciprocal(float scale) { return rne_by_reciprocal(scale); }

DSX_INLINE float sr_quotient(float y, ScaleDivisor d, bool by_reciprocal) {
  return by_reciprocal ? mul_rn(y, d.inv) : div_rn(y, d.scale);
}

// q (as an integral float in [-127, 127], +0 for zero) of y rounded
// stochastically with the random word `word`.
DSX_INLINE float quantize_sr(float y, float scale, uint32_t word) {
  if (!quantizes(scale)) return 0.0f;
  return code_value(sr_code(sr_quotient(y, scale_divisor(scale), sr_by_reciprocal(scale)), word));
}

DSX_INLINE float dequantize(float q, float scale) { return mul_rn(q, scale); }

// The error-feedback residual y - q * scale, rounded once.
DSX_INLINE float residual(float y, float q, float scale) { return fma_rn(-q, scale, y); }

// One step of the rank reduction: acc + q * scale, rounded once.
DSX_INLINE float accumulate(float acc, float q, float scale) { return fma_rn(q, scale, acc); }

}  // namespace int8q
}  // namespace deepseek_ext
