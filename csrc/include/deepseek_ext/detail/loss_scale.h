#pragma once
// The dynamic loss-scale state machine, shared by the CPU and CUDA kernels of
// update_scale_ (one definition, so both devices follow the same rule).
//
// Per optimizer step, given whether the gradients held an inf/NaN:
//   overflow:  the step is skipped (consecutive and total skip counts + 1) and
//              the clean-step count restarts. One overflow uses up one unit of
//              hysteresis; once none is left, every further overflow multiplies
//              the scale by backoff_factor.
//   clean:     the consecutive skip count resets and the clean-step count grows;
//              after growth_interval clean steps in a row the scale is
//              multiplied by growth_factor, the count restarts and the
//              hysteresis budget refills (Megatron-LM's rule).
// The result is clamped to [min_scale, max_scale] and rounded down to a power
// of two, so it is never 0, inf or NaN when the bounds are finite powers of two
// (the callers check that), and multiplying by it is exact.

#include <cstdint>
#include <cstring>

#include "deepseek_ext/detail/macros.h"

namespace deepseek_ext {
namespace amp {

struct LossScaleParams {
  float growth_factor;
  float backoff_factor;
  int64_t growth_interval;
  int64_t hysteresis;
  float min_scale;
  float max_scale;
};

struct LossScaleState {
  float scale;
  int32_t growth_tracker;      // clean steps since the scale last changed
  int32_t hysteresis_left;     // overflows still tolerated before backing off
  int64_t consecutive_skips;   // skipped steps in a row
  int64_t total_skips;         // skipped steps since the start
};

// The largest power of two <= x for finite x > 0 (clears the mantissa bits;
// subnormals, which no valid scale is, map to their top bit's exponent field).
DSX_INLINE float floor_pow2(float x) {
  uint32_t b;
  memcpy(&b, &x, sizeof b);
  b &= 0xff800000u;
  float r;
  memcpy(&r, &b, sizeof r);
  return r;
}

DSX_INLINE float clamp_scale(float x, float lo, float hi) {
  // NaN compares false both ways: it ends at lo, never propagates.
  if (!(x >= lo)) return lo;
  if (!(x <= hi)) return hi;
  return x;
}

DSX_INLINE void update_loss_scale(LossScaleState& s, bool found_inf, const LossScaleParams& p) {
  if (found_inf) {
    s.consecutive_skips += 1;
    s.total_skips += 1;
    s.growth_tracker = 0;
    if (s.hysteresis_left > 0) s.hysteresis_left -= 1;
    if (s.hysteresis_left == 0) {
      s.scale = floor_pow2(clamp_scale(s.scale * p.backoff_factor, p.min_scale, p.max_scale));
    }
  } else {
    s.consecutive_skips = 0;
    s.growth_tracker += 1;
    if (s.growth_tracker >= p.growth_interval) {
      s.growth_tracker = 0;
      s.hysteresis_left = static_cast<int32_t>(p.hysteresis);
      s.scale = floor_pow2(clamp_scale(s.scale * p.growth_factor, p.min_scale, p.max_scale));
    }
  }
}

// One step on state held in memory, as the update_scale_ kernels store it:
// scale float32[1], growth_tracker int32[1], hysteresis_tracker int32[1],
// skip_counts int64[2] (consecutive, total).
DSX_INLINE void update_loss_scale_in_place(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                           int64_t* skip_counts, bool found_inf, const LossScaleParams& p) {
  LossScaleState s{*scale, *growth_tracker, *hysteresis_tracker, skip_counts[0], skip_counts[1]};
  update_loss_scale(s, found_inf, p);
  *scale = s.scale;
  *growth_tracker = s.growth_tracker;
  *hysteresis_tracker = s.hysteresis_left;
  skip_counts[0] = s.consecutive_skips;
  skip_counts[1] = s.total_skips;
}

}  // namespace amp
}  // namespace deepseek_ext
