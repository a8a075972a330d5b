#pragma once
// The environment variables the library reads: run-time choices among CPU
// routes that compute the same op, so that every route can be tested, and
// compared, on a machine that would otherwise always take one of them.
// Nothing else in the library reads the environment.
//
//   DEEPSEEK_EXT_DISABLE_AVX512  set (to any value): the CPU kernels use their
//                                AVX2 code where they have an AVX-512 one
//                                (Philox in quantize, bfloat16 conversion in
//                                matmul_unscale_check). Read once per process.
//   DEEPSEEK_EXT_CPU_BF16_GEMM=0 matmul_unscale_check on the CPU does not take
//                                the AMX-BF16 brgemm route for bfloat16 inputs
//                                (they go through float32 copies). Read at every call.
//   DEEPSEEK_EXT_CPU_FP16_GEMM=0 matmul_unscale_check on the CPU does not take
//                                torch's float16 GEMM (AVX512-FP16) for float16
//                                inputs and output. Read at every call.

#include <cstdlib>
#include <cstring>

namespace deepseek_ext {
namespace ops {
namespace runtime_options {

// True when DEEPSEEK_EXT_DISABLE_AVX512 is set, whatever its value.
inline bool avx512_disabled() {
  static const bool disabled = std::getenv("DEEPSEEK_EXT_DISABLE_AVX512") != nullptr;
  return disabled;
}

namespace detail {
inline bool is_zero(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}
}  // namespace detail

// False when DEEPSEEK_EXT_CPU_BF16_GEMM=0.
inline bool cpu_bf16_gemm_allowed() { return !detail::is_zero("DEEPSEEK_EXT_CPU_BF16_GEMM"); }

// False when DEEPSEEK_EXT_CPU_FP16_GEMM=0.
inline bool cpu_fp16_gemm_allowed() { return !detail::is_zero("DEEPSEEK_EXT_CPU_FP16_GEMM"); }

}  // namespace runtime_options
}  // namespace ops
}  // namespace deepseek_ext
