#pragma once
// The float_bits.h format of each c10 floating-point element type.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "deepseek_ext/detail/float_bits.h"

namespace deepseek_ext {
namespace bits {

template <typename T>
struct FormatOf;
template <>
struct FormatOf<float> {
  using type = Fp32Format;
};
template <>
struct FormatOf<c10::Half> {
  using type = Fp16Format;
};
template <>
struct FormatOf<c10::BFloat16> {
  using type = Bf16Format;
};

template <typename T>
using format_of_t = typename FormatOf<T>::type;

}  // namespace bits
}  // namespace deepseek_ext
