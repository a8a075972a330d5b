// int8 gradient quantisation on CUDA: quantize_int8, quantize_int8_ef_,
// dequantize_int8 and dequantize_reduce_int8.
//
// quantize_int8 / quantize_int8_ef_: each block of kThreads threads owns a
// tile of whole quantisation blocks (at most 4096 elements); each thread owns
// 16 consecutive elements, read with 16-byte loads (x, and the residual for
// error feedback) into registers. block_size is a multiple of 32, so a
// thread's 16 elements lie in one quantisation block. absmax is reduced over
// the lanes of a warp that share a quantisation block (__match_any_sync +
// __reduce_max_sync on the magnitude bits); only block sizes that do not
// divide a warp's 512 elements then reduce across warps (one shared atomicMax
// per warp and block, two barriers), so with the default 256 the warps run
// independently. q (16 bytes per thread) and the new residual are written
// once.
//
// These kernels are bound by instructions per element rather than by bytes
// (float32 and 16-bit input reach the same element rate), so the per-element
// work is kept small. Round-to-nearest quantize does no division and no
// quarter-rate instruction: the quotient comes from one correctly rounded
// reciprocal per thread and two fmas (int8q::div_by, exact: Markstein), and
// rint and the int8 conversion are one FADD of 1.5 * 2^23 (int8q::rne_code),
// whose low byte is q, packed with byte permutes. Stochastic rounding has its
// own kernel (its Philox words would cost the round-to-nearest one registers):
// it rounds y * RN(1 / scale) (int8q::sr_quotient, one FMUL), decides
// u < frac with an fma rounding up and an integer compare instead of
// converting the random word to float (a quarter-rate I2F), and draws its
// Philox counter blocks one at a time (4 or 5 per thread). Lower bounds on
// resident blocks (kQuantMinBlocks, kSr16MinBlocks, kSrMinBlocks) keep more
// loads in flight, which 16-bit input needs most.
//
// dequantize_reduce_int8 and dequantize_int8 (W = 1) have one kernel each:
//   * W > 1: each thread owns 16 consecutive elements, one 16-byte q load and
//     one scale load per rank, accumulated in registers in rank order. Its
//     stores are four 16-byte stores at a 64-byte lane stride, which matters
//     little when the output is 1/W of the input.
//   * W = 1: the output is up to 4x the input, so the stores must be
//     coalesced: each thread owns 8 groups of 4 elements (warp-contiguous
//     4-byte q loads and 16/8-byte stores), the scale index is a shift for
//     power-of-two block sizes (a 64-bit division costs dozens of
//     instructions), the kernel is bounded to 3 blocks per SM, and on sm_90
//     one thread asks the L2 for the block's next tile ahead of its loads
//     (cp.async.bulk.prefetch: no registers, no wait; a hint, results do not
//     depend on it).
// quantize has no such prefetch: its limit is instructions, not latency.
// Measured bandwidths: benchmarks/results/quant_<gpu>.md; ceilings: benchmarks/GPU.md.
//
// All math is detail/int8_quant.h (the _rn intrinsics: nothing contracted), so
// the results equal the CPU kernels' bit for bit. No host synchronisation.

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "deepseek_ext/detail/int8_quant.h"
#include "deepseek_ext/detail/philox.h"
#include "quantize/quantize.h"

namespace deepseek_ext {
namespace ops {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;
constexpr int kTileElems = kThreads * kPerThread;  // 4096 = the largest block_size
constexpr int kMaxBlocksPerTile = kTileElems / int8q::kBlockMultiple;
constexpr int kWarpElems = 32 * kPerThread;
// Round-to-nearest quantize: at least 5 resident blocks (48 registers a thread)
// instead of the 4 that its 50-56 registers allow; more loads in flight.
constexpr int kQuantMinBlocks = 5;
// Stochastic rounding: 16-bit input at least 4 resident blocks (64 registers a
// thread, no spills) instead of the 2 that its 88 registers would allow;
// float32 input and error feedback 3 (80 registers; at 64 they spill).
constexpr int kSr16MinBlocks = 4;
constexpr int kSrMinBlocks = 3;

template <typename scalar_t, bool kEF, bool kSR>
constexpr int quant_min_blocks() {
  if (!kSR) return kEF ? 1 : kQuantMinBlocks;
  return sizeof(scalar_t) == 2 && !kEF ? kSr16MinBlocks : kSrMinBlocks;
}
static_assert(kTileElems == int8q::kMaxBlockSize, "a tile holds at least one block");

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float f) {
  return static_cast<T>(f);
}

// Asks the L2 to fetch the 16-byte-aligned part of [p, p + bytes) (sm_90's bulk
// prefetch, asynchronous; a no-op before sm_90). Only a hint: the data is
// loaded normally afterwards.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint64_t a = static_cast<uint64_t>(__cvta_generic_to_global(p));
  const uint64_t lo = (a + 15) & ~uint64_t{15};
  const uint64_t hi = (a + static_cast<uint64_t>(bytes)) & ~uint64_t{15};
  if (bytes > 0 && hi > lo) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo),
                 "r"(static_cast<uint32_t>(hi - lo))
                 : "memory");
  }
#else
  (void)p;
  (void)bytes;
#endif
}

// v[0, 16) = p[0, 16) as floats; elements at or past `valid` read as 0.
template <typename T>
__device__ __forceinline__ void load16(const T* p, int64_t valid, bool vec_ok, float (&v)[16]) {
  if (vec_ok && valid >= kPerThread) {
    constexpr int kVecs = kPerThread * sizeof(T) / 16;
    uint4 raw[kVecs];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) raw[k] = reinterpret_cast<const uint4*>(p)[k];
    T e[kPerThread];
    memcpy(e, raw, sizeof e);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) v[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) v[i] = i < valid ? to_float(p[i]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store16(T* p, int64_t valid, bool vec_ok, const float (&v)[16]) {
  T e[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) e[i] = from_float<T>(v[i]);
  if (vec_ok && valid >= kPerThread) {
    constexpr int kVecs = kPerThread * sizeof(T) / 16;
    uint4 raw[kVecs];
    memcpy(raw, e, sizeof raw);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) reinterpret_cast<uint4*>(p)[k] = raw[k];
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (i < valid) p[i] = e[i];
    }
  }
}

// q codes (int8q::rne_code) of 16 values of a block with scale `scale` > 0.
// kReciprocal: divide through one reciprocal (int8q::div_by, needs
// int8q::rne_by_reciprocal(scale)), else by a division per value; the codes
// are the same.
template <bool kReciprocal>
__device__ __forceinline__ void rne_codes16(const float (&y)[16], float scale, float (&t)[16]) {
  const int8q::ScaleDivisor d = kReciprocal ? int8q::scale_divisor(scale) : int8q::ScaleDivisor{scale, 0.0f};
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    t[i] = int8q::rne_code(kReciprocal ? int8q::div_by(y[i], d) : int8q::div_rn(y[i], scale));
  }
}

// Stochastic codes (int8q::sr_code) of 16 values; the first one's Philox word
// is word kShift of counter block `first` (4 or 5 blocks for 16 values). The
// quotient is int8q::sr_quotient: one multiplication per value (kReciprocal),
// or a division per value for the rare scales outside [2^-90, 2^90].
template <int kShift, bool kReciprocal>
__device__ __forceinline__ void sr_codes16(const float (&y)[16], int8q::ScaleDivisor d, uint64_t seed,
                                           uint64_t first, float (&t)[16]) {
  // Counter block by counter block, so that at most two blocks' words are live.
  constexpr int kBlocks = kShift == 0 ? 4 : 5;
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) {
    const philox::Words o = philox::philox_block(seed, first + b);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = 4 * b + j - kShift;  // the value that draws word j of block b
      if (i >= 0 && i < kPerThread) t[i] = int8q::sr_code(int8q::sr_quotient(y[i], d, kReciprocal), o.w[j]);
    }
  }
}

template <bool kReciprocal>
__device__ __forceinline__ void sr_codes16(const float (&y)[16], int8q::ScaleDivisor d, uint64_t seed,
                                           uint64_t g0, float (&t)[16]) {
  const uint64_t first = g0 >> 2;
  switch (static_cast<int>(g0 & 3)) {
    case 0: sr_codes16<0, kReciprocal>(y, d, seed, first, t); break;
    case 1: sr_codes16<1, kReciprocal>(y, d, seed, first, t); break;
    case 2: sr_codes16<2, kReciprocal>(y, d, seed, first, t); break;
    default: sr_codes16<3, kReciprocal>(y, d, seed, first, t); break;
  }
}

// Four codes' low bytes (their int8 q) as one word, first in the lowest byte.
__device__ __forceinline__ uint32_t pack4(float a, float b, float c, float d) {
  const uint32_t ab = __byte_perm(__float_as_uint(a), __float_as_uint(b), 0x0040);
  const uint32_t cd = __byte_perm(__float_as_uint(c), __float_as_uint(d), 0x0040);
  return __byte_perm(ab, cd, 0x5410);
}

struct QuantParams {
  int64_t n;
  int block_size;
  int blocks_per_tile;
  bool vec_ok;  // x and residual 16-byte aligned
  bool stochastic;
  uint64_t seed;
  uint64_t offset;
};

// kSR: stochastic rounding, its own kernel so that the round-to-nearest one
// does not carry its registers (Philox words).
template <typename scalar_t, typename res_t, bool kEF, bool kSR>
__global__ void __launch_bounds__(kThreads, quant_min_blocks<scalar_t, kEF, kSR>())
    quantize_int8_kernel(const scalar_t* __restrict__ x, res_t* __restrict__ res,
                         int8_t* __restrict__ q, float* __restrict__ scales, QuantParams p) {
  __shared__ uint32_t amax_s[kMaxBlocksPerTile];
  const int64_t tile_elems = static_cast<int64_t>(p.block_size) * p.blocks_per_tile;
  const int64_t first_block = static_cast<int64_t>(blockIdx.x) * p.blocks_per_tile;
  // Quantisation blocks that divide a warp's 32 * 16 = 512 elements (32 ... 512,
  // powers of two, the default 256 among them) lie in one warp each: their
  // absmax needs no shared memory and no barrier, so the warps of a block run
  // independently. Other sizes (96, 1024, ...) reduce across warps.
  const bool in_warp = kWarpElems % p.block_size == 0;  // the same for every thread
  if (!in_warp) {
    for (int i = threadIdx.x; i < p.blocks_per_tile; i += kThreads) amax_s[i] = 0;
  }

  const int local = threadIdx.x * kPerThread;
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * tile_elems + local;
  const bool active = local < tile_elems && e0 < p.n;
  const int64_t valid = active ? min(static_cast<int64_t>(kPerThread), p.n - e0) : 0;
  const int lb = active ? local / p.block_size : -1;  // quantisation block within the tile

  float y[kPerThread];
  uint32_t mag = 0;
  if (active) {
    load16(x + e0, valid, p.vec_ok, y);
    if constexpr (kEF) {
      float r[kPerThread];
      load16(res + e0, valid, p.vec_ok, r);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) y[i] = int8q::add_rn(y[i], r[i]);
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      // Elements past `valid` are 0 and do not change the maximum.
      const uint32_t m = int8q::magnitude_bits(y[i]);
      mag = m > mag ? m : mag;
    }
  }
  // Warp-level absmax over the lanes of the same quantisation block.
  const unsigned peers = __match_any_sync(0xffffffffu, lb);
  mag = __reduce_max_sync(peers, mag);
  if (!in_warp) {
    __syncthreads();  // amax_s zeroed
    const int lane = threadIdx.x & 31;
    if (active && lane == __ffs(peers) - 1) atomicMax(&amax_s[lb], mag);
    __syncthreads();
    if (active) mag = amax_s[lb];
  }
  if (!active) return;

  const float scale = int8q::scale_from_absmax_bits(mag);
  if (local % p.block_size == 0) scales[first_block + lb] = scale;

  // q codes (int8q::rne_code): q is the low byte, code_value(t) its float value.
  float t[kPerThread];
  if (!int8q::quantizes(scale)) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) t[i] = int8q::kRoundMagic;  // q = 0
  } else if constexpr (kSR) {
    const uint64_t g0 = p.offset + static_cast<uint64_t>(e0);
    if (int8q::sr_by_reciprocal(scale)) {
      sr_codes16<true>(y, int8q::scale_divisor(scale), p.seed, g0, t);
    } else {
      sr_codes16<false>(y, int8q::ScaleDivisor{scale, 0.0f}, p.seed, g0, t);
    }
  } else if (int8q::rne_by_reciprocal(scale)) {
    rne_codes16<true>(y, scale, t);
  } else {
    rne_codes16<false>(y, scale, t);
  }

  // q: 16 bytes, aligned (fresh tensor, e0 % 16 == 0) unless this is the tail.
  if (valid == kPerThread) {
    uint4 raw;
    raw.x = pack4(t[0], t[1], t[2], t[3]);
    raw.y = pack4(t[4], t[5], t[6], t[7]);
    raw.z = pack4(t[8], t[9], t[10], t[11]);
    raw.w = pack4(t[12], t[13], t[14], t[15]);
    *reinterpret_cast<uint4*>(q + e0) = raw;
  } else {
    for (int i = 0; i < valid; ++i) q[e0 + i] = int8q::code_byte(t[i]);
  }

  if constexpr (kEF) {
    // A non-finite block keeps its residual; otherwise y - q * scale (y when scale is 0).
    if (scale == scale) {
      float r[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) r[i] = int8q::residual(y[i], int8q::code_value(t[i]), scale);
      store16(res + e0, valid, p.vec_ok, r);
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename scalar_t, typename res_t, bool kEF>
void launch_quantize(const at::Tensor& x, const at::Tensor& residual, at::Tensor& q,
                     at::Tensor& scales, QuantParams p, cudaStream_t stream) {
  const auto* xp = x.const_data_ptr<scalar_t>();
  res_t* rp = kEF ? residual.mutable_data_ptr<res_t>() : nullptr;
  p.vec_ok = aligned16(xp) && (!kEF || aligned16(rp));
  const int64_t nblocks = num_quant_blocks(p.n, p.block_size);
  const int64_t tiles = (nblocks + p.blocks_per_tile - 1) / p.blocks_per_tile;
  const auto kernel = p.stochastic ? quantize_int8_kernel<scalar_t, res_t, kEF, true>
                                   : quantize_int8_kernel<scalar_t, res_t, kEF, false>;
  kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(xp, rp, q.mutable_data_ptr<int8_t>(),
                                                                scales.mutable_data_ptr<float>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_quantize(const at::Tensor& x, const at::Tensor& residual, at::Tensor& q,
                       at::Tensor& scales, const QuantParams& p, cudaStream_t stream) {
  if (!residual.defined()) {
    launch_quantize<scalar_t, float, false>(x, residual, q, scales, p, stream);
  } else if (residual.scalar_type() == at::kFloat) {
    launch_quantize<scalar_t, float, true>(x, residual, q, scales, p, stream);
  } else {
    launch_quantize<scalar_t, c10::BFloat16, true>(x, residual, q, scales, p, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_impl(const at::Tensor& x_in, const at::Tensor& res_in,
                                                 int64_t block_size, bool stochastic, int64_t seed,
                                                 int64_t offset) {
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = at::empty(x_in.sizes(), x_in.options().dtype(at::kChar));
  at::Tensor scales =
      at::empty({num_quant_blocks(x.numel(), block_size)}, x_in.options().dtype(at::kFloat));
  if (x.numel() == 0) return {q, scales};
  at::Tensor residual = res_in.defined() ? res_in.contiguous() : at::Tensor();
  QuantParams p{};
  p.n = x.numel();
  p.block_size = static_cast<int>(block_size);
  p.blocks_per_tile = static_cast<int>(kTileElems / block_size);
  p.stochastic = stochastic;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_quantize<float>(x, residual, q, scales, p, stream); break;
    case at::kHalf: dispatch_quantize<c10::Half>(x, residual, q, scales, p, stream); break;
    case at::kBFloat16: dispatch_quantize<c10::BFloat16>(x, residual, q, scales, p, stream); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", x.scalar_type());
  }
  if (residual.defined() && !residual.is_same(res_in)) res_in.copy_(residual);
  return {q, scales};
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x, int64_t block_size,
                                                      bool stochastic, int64_t seed,
                                                      int64_t offset) {
  check_quantize_inputs(x, block_size, offset, c10::DeviceType::CUDA);
  return quantize_impl(x, at::Tensor(), block_size, stochastic, seed, offset);
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_ef_cuda(const at::Tensor& x,
                                                         const at::Tensor& residual,
                                                         int64_t block_size, bool stochastic,
                                                         int64_t seed, int64_t offset) {
  check_quantize_ef_inputs(x, residual, block_size, offset, c10::DeviceType::CUDA);
  return quantize_impl(x, residual, block_size, stochastic, seed, offset);
}

// dequantize (W = 1): a thread owns kDqGroups groups of kDqVec consecutive
// elements, kThreads * kDqVec elements apart, so each warp-wide q load (4 bytes
// a lane) and each output store (16 bytes a lane for float32, 8 for 16-bit
// types) covers one contiguous span.
constexpr int kDqVec = 4;
constexpr int kDqGroups = 8;
constexpr int64_t kDqTile = int64_t{kThreads} * kDqVec * kDqGroups;  // elements per block step
// At least 3 resident blocks per SM (68 registers a thread, no spills).
constexpr int kDqMinBlocks = 3;

template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t valid, const float (&v)[kDqVec]) {
  T e[kDqVec];
#pragma unroll
  for (int i = 0; i < kDqVec; ++i) e[i] = from_float<T>(v[i]);
  if (valid >= kDqVec) {  // p is kDqVec * sizeof(T) aligned: fresh output, e0 % 4 == 0
    if constexpr (sizeof(T) == 4) {
      uint4 raw;
      memcpy(&raw, e, sizeof raw);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      static_assert(sizeof(T) == 2, "float32, float16 or bfloat16 output");
      uint2 raw;
      memcpy(&raw, e, sizeof raw);
      *reinterpret_cast<uint2*>(p) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kDqVec; ++i) {
      if (i < valid) p[i] = e[i];
    }
  }
}

struct DequantParams {
  int64_t W;
  int64_t n;        // elements per rank
  int64_t nblocks;  // scales per rank
  int block_size;
  int block_shift;  // log2(block_size) when it is a power of two, else -1
  float multiplier;
};

__device__ __forceinline__ int64_t scale_index(int64_t e, const DequantParams& p) {
  return p.block_shift >= 0 ? e >> p.block_shift : e / p.block_size;
}

// out = multiplier * (q * scale), for W = 1. vec_ok: q is 4-byte aligned and
// n % 4 == 0.
template <typename out_t>
__global__ void __launch_bounds__(kThreads, kDqMinBlocks)
    dequantize_int8_kernel(const int8_t* __restrict__ q, const float* __restrict__ scales,
                           out_t* __restrict__ out, DequantParams p, bool vec_ok) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kDqTile;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kDqTile; base < p.n; base += step) {
    const int64_t next = base + step;
    if (threadIdx.x == 0 && next < p.n) prefetch_l2(q + next, min(kDqTile, p.n - next));
    int8_t qb[kDqGroups][kDqVec];
    float s[kDqGroups];
    // Every load is issued before any is used.
#pragma unroll
    for (int g = 0; g < kDqGroups; ++g) {
      const int64_t e0 = base + (static_cast<int64_t>(g) * kThreads + threadIdx.x) * kDqVec;
      const int64_t valid = p.n - e0;  // <= 0: past the end
      if (vec_ok && valid >= kDqVec) {
        const uint32_t raw = *reinterpret_cast<const uint32_t*>(q + e0);
        memcpy(qb[g], &raw, sizeof raw);
      } else {
#pragma unroll
        for (int i = 0; i < kDqVec; ++i) qb[g][i] = i < valid ? q[e0 + i] : int8_t{0};
      }
      // block_size % 32 == 0 and e0 % 4 == 0: a group lies in one block.
      s[g] = valid > 0 ? scales[scale_index(e0, p)] : 0.0f;
    }
#pragma unroll
    for (int g = 0; g < kDqGroups; ++g) {
      const int64_t e0 = base + (static_cast<int64_t>(g) * kThreads + threadIdx.x) * kDqVec;
      if (e0 >= p.n) continue;
      float v[kDqVec];
#pragma unroll
      for (int i = 0; i < kDqVec; ++i) {
        // The reduction's arithmetic with one rank: fma(q, scale, 0), then the multiplier.
        v[i] = int8q::mul_rn(p.multiplier,
                             int8q::accumulate(0.0f, static_cast<float>(qb[g][i]), s[g]));
      }
      store4(out + e0, p.n - e0, v);
    }
  }
}

// out = multiplier * sum_w q[w] * scales[w], for W > 1: a thread owns 16
// consecutive elements (within one quantisation block: block_size % 32 == 0)
// and accumulates every rank in registers, in rank order. vec_ok: q is
// 16-byte aligned and n % 16 == 0.
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    dequantize_reduce_int8_kernel(const int8_t* __restrict__ q, const float* __restrict__ scales,
                                  out_t* __restrict__ out, DequantParams p, bool vec_ok) {
  const int64_t groups = (p.n + kPerThread - 1) / kPerThread;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e0 = g * kPerThread;
    const int64_t valid = min(static_cast<int64_t>(kPerThread), p.n - e0);
    const int64_t blk = scale_index(e0, p);
    float acc[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) acc[i] = 0.0f;
    for (int64_t w = 0; w < p.W; ++w) {
      const int8_t* qw = q + w * p.n + e0;
      const float s = scales[w * p.nblocks + blk];
      int8_t qb[kPerThread];
      if (vec_ok && valid == kPerThread) {
        const uint4 raw = *reinterpret_cast<const uint4*>(qw);
        memcpy(qb, &raw, sizeof qb);
      } else {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) qb[i] = i < valid ? qw[i] : int8_t{0};
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        acc[i] = int8q::accumulate(acc[i], static_cast<float>(qb[i]), s);
      }
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) acc[i] = int8q::mul_rn(p.multiplier, acc[i]);
    store16(out + e0, valid, true, acc);  // out: fresh tensor, e0 % 16 == 0
  }
}

template <typename out_t>
void launch_dequantize(const int8_t* q, const float* scales, at::Tensor& out,
                       const DequantParams& p, cudaStream_t stream) {
  const int64_t grid_max =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const auto q_addr = reinterpret_cast<uintptr_t>(q);
  out_t* o = out.mutable_data_ptr<out_t>();
  if (p.W == 1) {
    const auto grid = static_cast<unsigned>(std::min<int64_t>((p.n + kDqTile - 1) / kDqTile, grid_max));
    dequantize_int8_kernel<out_t>
        <<<grid, kThreads, 0, stream>>>(q, scales, o, p, q_addr % 4 == 0 && p.n % 4 == 0);
  } else {
    // W == 0 (no ranks) runs this kernel too: it writes zeros.
    const int64_t groups = (p.n + kPerThread - 1) / kPerThread;
    const auto grid =
        static_cast<unsigned>(std::min<int64_t>((groups + kThreads - 1) / kThreads, grid_max));
    dequantize_reduce_int8_kernel<out_t>
        <<<grid, kThreads, 0, stream>>>(q, scales, o, p, q_addr % 16 == 0 && p.n % 16 == 0);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dequantize_reduce_impl(const at::Tensor& q_in, const at::Tensor& scales_in,
                                  int64_t block_size, double multiplier, at::ScalarType dtype) {
  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const int64_t W = q.size(0);
  const int64_t n = q.size(1);
  at::Tensor out = at::empty({n}, q.options().dtype(dtype));
  if (n == 0) return out;
  const auto* qp = q.const_data_ptr<int8_t>();
  const auto* sp = scales.const_data_ptr<float>();
  DequantParams p{};
  p.W = W;
  p.n = n;
  p.nblocks = num_quant_blocks(n, block_size);
  p.block_size = static_cast<int>(block_size);
  p.block_shift = (block_size & (block_size - 1)) == 0 ? __builtin_ctzll(block_size) : -1;
  p.multiplier = static_cast<float>(multiplier);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat: launch_dequantize<float>(qp, sp, out, p, stream); break;
    case at::kHalf: launch_dequantize<c10::Half>(qp, sp, out, p, stream); break;
    case at::kBFloat16: launch_dequantize<c10::BFloat16>(qp, sp, out, p, stream); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", dtype);
  }
  return out;
}

at::Tensor dequantize_reduce_int8_cuda(const at::Tensor& q, const at::Tensor& scales,
                                       int64_t block_size, double multiplier,
                                       at::ScalarType dtype) {
  check_dequantize_reduce_inputs(q, scales, block_size, dtype, c10::DeviceType::CUDA);
  return dequantize_reduce_impl(q, scales, block_size, multiplier, dtype);
}

at::Tensor dequantize_int8_cuda(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                                at::ScalarType dtype, int64_t numel) {
  check_dequantize_inputs(q, scales, block_size, dtype, numel, c10::DeviceType::CUDA);
  return dequantize_reduce_impl(q.reshape({1, numel}), scales.reshape({1, scales.numel()}),
                                block_size, 1.0, dtype)
      .view(q.sizes());
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("quantize_int8", &deepseek_ext::ops::quantize_int8_cuda);
  m.impl("quantize_int8_ef_", &deepseek_ext::ops::quantize_int8_ef_cuda);
  m.impl("dequantize_int8", &deepseek_ext::ops::dequantize_int8_cuda);
  m.impl("dequantize_reduce_int8", &deepseek_ext::ops::dequantize_reduce_int8_cuda);
}
