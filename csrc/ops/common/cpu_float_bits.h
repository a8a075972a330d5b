#pragma once
// Vectorised inf/NaN detection on the CPU, on raw bits (detail/float_bits.h):
// the largest magnitude bits of an array, read only.

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <type_traits>

#include "deepseek_ext/detail/float_formats.h"

namespace deepseek_ext {
namespace ops {

template <typename T>
using bits_of_t = typename bits::format_of_t<T>::bits_type;

// |v| as the magnitude bits of each lane, in a signed integer of v's width
// (magnitude bits are < 2^31 for float32, < 2^15 for 16-bit: a signed max works).
template <typename T>
auto magnitude_bits_vec(const at::vec::Vectorized<T>& v) {
  using ibits_t = std::make_signed_t<bits_of_t<T>>;
  static_assert(at::vec::Vectorized<T>::size() == at::vec::Vectorized<ibits_t>::size(),
                "bit view must have as many lanes as values");
  return at::vec::cast<ibits_t>(v) &
         at::vec::Vectorized<ibits_t>(static_cast<ibits_t>(bits::format_of_t<T>::kMagnitudeMask));
}

template <typename T>
bits_of_t<T> max_lane(const at::vec::Vectorized<std::make_signed_t<bits_of_t<T>>>& v) {
  std::make_signed_t<bits_of_t<T>> lanes[at::vec::Vectorized<std::make_signed_t<bits_of_t<T>>>::size()];
  v.store(lanes);
  return static_cast<bits_of_t<T>>(*std::max_element(std::begin(lanes), std::end(lanes)));
}

// The largest magnitude bits in x[0, n): 0 for n == 0. Magnitude bits order
// like magnitudes, and every inf/NaN is at least Format::kInfBits.
template <typename T>
bits_of_t<T> max_magnitude_bits(const T* x, int64_t n) {
  using ibits_t = std::make_signed_t<bits_of_t<T>>;
  using Vec = at::vec::Vectorized<T>;
  at::vec::Vectorized<ibits_t> m0(0), m1(0);  // two chains keep more loads in flight
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    m0 = at::vec::maximum(m0, magnitude_bits_vec(Vec::loadu(x + i)));
    m1 = at::vec::maximum(m1, magnitude_bits_vec(Vec::loadu(x + i + Vec::size())));
  }
  bits_of_t<T> m = max_lane<T>(at::vec::maximum(m0, m1));
  for (; i < n; ++i) {
    bits_of_t<T> b;
    std::memcpy(&b, x + i, sizeof b);
    m = std::max(m, bits::magnitude_bits<bits::format_of_t<T>>(b));
  }
  return m;
}

}  // namespace ops
}  // namespace deepseek_ext
