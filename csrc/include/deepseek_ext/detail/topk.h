#pragma once
// Top-k selection of one row by insertion, shared by the CPU and CUDA routing
// kernels of the gated sparse FFN so both pick the same blocks: values in
// descending order, and among equal values the lower index first (a strict >
// never moves an equal value ahead of an earlier one).

#include <cstdint>

#include "deepseek_ext/detail/macros.h"

namespace deepseek_ext {
namespace detail {

// Offers (v, b) to the running top-k best[0..filled) / arg[0..filled).
template <typename index_t>
DSX_INLINE void topk_offer(float v, index_t b, float* best, index_t* arg, int64_t k, int64_t& filled) {
  if (filled == k && !(v > best[k - 1])) return;
  int64_t i = filled < k ? filled++ : k - 1;
  while (i > 0 && v > best[i - 1]) {
    best[i] = best[i - 1];
    arg[i] = arg[i - 1];
    --i;
  }
  best[i] = v;
  arg[i] = b;
}

}  // namespace detail
}  // namespace deepseek_ext
