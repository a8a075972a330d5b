#pragma once
// Non-finite detection on the raw bits of IEEE-754 binary32, binary16 and
// bfloat16 values, shared by the CPU and CUDA kernels.
//
// A value is inf or NaN exactly when all of its exponent bits are set. With the
// sign bit cleared, that is the same as "magnitude bits >= the bits of +inf", so
// the test over many values reduces to a maximum of `magnitude_bits(x)` compared
// once against `kInfBits` — a reduction that vectorises well and that no
// floating-point optimisation (-ffast-math, --use_fast_math) can remove, because
// it never looks at the values as floats.

#include <cstdint>

#include "deepseek_ext/detail/macros.h"

namespace deepseek_ext {
namespace bits {


// binary32: 1 sign, 8 exponent, 23 mantissa bits.
struct Fp32Format {
  using bits_type = uint32_t;
  static constexpr bits_type kMagnitudeMask = 0x7fffffffu;
  static constexpr bits_type kInfBits = 0x7f800000u;
};

// binary16: 1 sign, 5 exponent, 10 mantissa bits.
struct Fp16Format {
  using bits_type = uint16_t;
  static constexpr bits_type kMagnitudeMask = 0x7fffu;
  static constexpr bits_type kInfBits = 0x7c00u;
};

// bfloat16: 1 sign, 8 exponent, 7 mantissa bits.
struct Bf16Format {
  using bits_type = uint16_t;
  static constexpr bits_type kMagnitudeMask = 0x7fffu;
  static constexpr bits_type kInfBits = 0x7f80u;
};

// The magnitude bits of one value (sign cleared).
template <typename Format>
DSX_INLINE typename Format::bits_type magnitude_bits(typename Format::bits_type b) {
  return static_cast<typename Format::bits_type>(b & Format::kMagnitudeMask);
}

// True when the value with these bits is +-inf or NaN.
template <typename Format>
DSX_INLINE bool is_nonfinite_bits(typename Format::bits_type b) {
  return magnitude_bits<Format>(b) >= Format::kInfBits;
}

// True when the largest magnitude_bits() seen over a set of values belongs to
// an inf or NaN, i.e. when the set holds at least one non-finite value.
template <typename Format>
DSX_INLINE bool max_magnitude_is_nonfinite(typename Format::bits_type max_magnitude) {
  return max_magnitude >= Format::kInfBits;
}

}  // namespace bits
}  // namespace deepseek_ext
