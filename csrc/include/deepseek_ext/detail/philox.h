#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a counter-based generator, the same function on the host and the
// device. Given a 128-bit counter and a 64-bit key it returns four 32-bit
// words; equal inputs give equal outputs everywhere, so the CPU and CUDA
// kernels draw bit-identical random numbers without sharing any state.
//
// This is the Random123 / cuRAND / ATen (at::Philox4_32) algorithm: the
// known-answer vectors of Random123 and ATen's engine are checked against it
// in tests/cpp/test_quantize.cpp.

#include <cstdint>

#include "deepseek_ext/detail/macros.h"

namespace deepseek_ext {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Words {
  uint32_t w[4];
};

DSX_INLINE uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32-10 of counter c under key (k0, k1).
DSX_INLINE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kMul0, c0, &hi0);
    const uint32_t lo1 = mulhilo(kMul1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Words{{c0, c1, c2, c3}};
}

// The four words of 64-bit counter block `index` (counter = {lo, hi, 0, 0})
// under a 64-bit seed (key = {lo, hi}): the words at::Philox4_32(seed, 0,
// index) yields first.
DSX_INLINE Words philox_block(uint64_t seed, uint64_t index) {
  return philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// One 32-bit random word per element index: word (index % 4) of counter block
// index / 4. Element i of a stream keyed by (seed, offset) uses index offset + i.
DSX_INLINE uint32_t philox_word(uint64_t seed, uint64_t index) {
  const Words b = philox_block(seed, index >> 2);
  return b.w[index & 3];
}

}  // namespace philox
}  // namespace deepseek_ext
