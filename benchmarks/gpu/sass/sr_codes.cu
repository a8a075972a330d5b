// Static SASS analysis of stochastic rounding's per-thread work on sm_90a
// (no GPU needed): count.sh compiles this file and counts the instructions of
// each kernel. Every kernel loads 16 float32 values, quantises them against
// one scale and stores 16 int8 codes, as quantize_int8_kernel's threads do:
//   k<0>: the rounding before 2026-12-05 (a correctly rounded division per
//         value, the random word converted to float), kept here to compare;
//   k<1>: int8q::sr_quotient + int8q::sr_code, what the kernels run now;
//   k<2>: Philox4x32-10 words only (4 counter blocks for 16 values);
//   k<3>: k<1> without Philox (the words are a hash of the values).
// Instructions per value = total / 16. A count, not a timing: the GPU check
// measures time.
#include <cstdint>

#include "deepseek_ext/detail/int8_quant.h"
#include "deepseek_ext/detail/philox.h"

namespace int8q = deepseek_ext::int8q;
namespace philox = deepseek_ext::philox;

__device__ __forceinline__ uint32_t pack4(float a, float b, float c, float d) {
  const uint32_t ab = __byte_perm(__float_as_uint(a), __float_as_uint(b), 0x0040);
  const uint32_t cd = __byte_perm(__float_as_uint(c), __float_as_uint(d), 0x0040);
  return __byte_perm(ab, cd, 0x5410);
}

// The code of v before 2026-12-05: u from the top 24 bits of the word, as a float.
__device__ __forceinline__ float sr_code_before(float v, uint32_t word) {
  const float vc = int8q::clamp_q(v);
  const float t = int8q::floor_code(vc);
  const float frac = int8q::sub_rn(vc, int8q::code_value(t));
  const float u = __fmul_rn(static_cast<float>(word >> 8), 5.9604644775390625e-08f);
  return u < frac ? int8q::add_rn(t, 1.0f) : t;
}

template <int kMode>
__global__ void k(const float4* __restrict__ x, uint4* __restrict__ q, float scale, uint64_t seed,
                  uint64_t offset) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float y[16];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float4 v = x[4 * i + j];
    y[4 * j] = v.x;
    y[4 * j + 1] = v.y;
    y[4 * j + 2] = v.z;
    y[4 * j + 3] = v.w;
  }
  uint32_t w[16];
  if constexpr (kMode == 3) {
#pragma unroll
    for (int j = 0; j < 16; ++j) w[j] = __float_as_uint(y[j]) * 2654435761u;
  } else {
    const uint64_t first = (offset + 16 * static_cast<uint64_t>(i)) >> 2;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const philox::Words o = philox::philox_block(seed, first + b);
#pragma unroll
      for (int j = 0; j < 4; ++j) w[4 * b + j] = o.w[j];
    }
  }
  const int8q::ScaleDivisor d = int8q::scale_divisor(scale);
  float t[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    if constexpr (kMode == 0) {
      t[j] = sr_code_before(int8q::div_rn(y[j], scale), w[j]);
    } else if constexpr (kMode == 2) {
      t[j] = __uint_as_float(w[j]);
    } else {
      t[j] = int8q::sr_code(int8q::sr_quotient(y[j], d, true), w[j]);
    }
  }
  q[i] = make_uint4(pack4(t[0], t[1], t[2], t[3]), pack4(t[4], t[5], t[6], t[7]),
                    pack4(t[8], t[9], t[10], t[11]), pack4(t[12], t[13], t[14], t[15]));
}

template __global__ void k<0>(const float4*, uint4*, float, uint64_t, uint64_t);
template __global__ void k<1>(const float4*, uint4*, float, uint64_t, uint64_t);
template __global__ void k<2>(const float4*, uint4*, float, uint64_t, uint64_t);
template __global__ void k<3>(const float4*, uint4*, float, uint64_t, uint64_t);
