// unscale_and_check_ on the CPU: one parallel pass over every gradient.
//
// The list is cut into work items of at most kItemElems elements (small
// tensors are one item each), and at::parallel_for spreads the items over the
// threads. Each item is checked for inf/NaN on its raw bits (a vectorised
// integer max, see detail/float_bits.h) and, unless inv_scale is exactly 1,
// multiplied in place with at::vec::Vectorized in float arithmetic, in the
// same pass.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/cpu_float_bits.h"
#include "deepseek_ext/detail/float_formats.h"
#include "unscale_and_check/unscale_and_check.h"

namespace deepseek_ext {
namespace ops {
namespace {

using at::vec::Vectorized;

// Elements per work item: large enough to amortise scheduling, small enough
// that a 2-core machine balances a few large tensors well.
constexpr int64_t kItemElems = int64_t{1} << 16;

struct WorkItem {
  void* data;
  int64_t begin;
  int64_t end;
  at::ScalarType dtype;
};

// data[i] *= s in float arithmetic and the largest magnitude bits of data[0, n)
// before scaling (see detail/float_bits.h), in one pass over memory; true if
// any value is inf/NaN. (The check alone is max_magnitude_bits.)
template <typename scalar_t>
bool check_and_scale(scalar_t* data, int64_t n, float s) {
  using Format = bits::format_of_t<scalar_t>;
  // Magnitude bits are < 2^31 (fp32) or < 2^15 (16-bit), so a signed max works.
  using ibits_t = std::make_signed_t<typename Format::bits_type>;
  using Vec = Vectorized<scalar_t>;
  using IVec = Vectorized<ibits_t>;
  using FVec = Vectorized<float>;
  static_assert(Vec::size() == IVec::size(), "bit view must have as many lanes as values");
  const IVec mask(static_cast<ibits_t>(Format::kMagnitudeMask));
  const FVec sv(s);
  IVec acc(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(data + i);
    acc = at::vec::maximum(acc, at::vec::cast<ibits_t>(v) & mask);
    if constexpr (std::is_same_v<scalar_t, float>) {
      (v * sv).store(data + i);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(v);
      at::vec::convert_from_float<scalar_t>(lo * sv, hi * sv).store(data + i);
    }
  }
  ibits_t lanes[IVec::size()];
  acc.store(lanes);
  ibits_t m = 0;
  for (int64_t l = 0; l < IVec::size(); ++l) m = std::max(m, lanes[l]);
  const auto* bits = reinterpret_cast<const ibits_t*>(data);
  for (; i < n; ++i) {
    m = std::max(m, static_cast<ibits_t>(bits[i] & static_cast<ibits_t>(Format::kMagnitudeMask)));
    data[i] = static_cast<scalar_t>(static_cast<float>(data[i]) * s);
  }
  return bits::max_magnitude_is_nonfinite<Format>(static_cast<typename Format::bits_type>(m));
}

template <typename scalar_t>
bool process_item(const WorkItem& item, float inv_scale, bool write) {
  auto* p = static_cast<scalar_t*>(item.data) + item.begin;
  const int64_t n = item.end - item.begin;
  if (write) return check_and_scale(p, n, inv_scale);
  return bits::max_magnitude_is_nonfinite<bits::format_of_t<scalar_t>>(max_magnitude_bits(p, n));
}

void unscale_and_check_cpu(at::TensorList grads, const at::Tensor& found_inf,
                           const at::Tensor& inv_scale) {
  check_unscale_and_check_inputs(grads, found_inf, inv_scale, c10::DeviceType::CPU);
  const float s = *inv_scale.const_data_ptr<float>();
  const bool write = s != 1.0f;  // exactly 1: check only, no write pass

  const std::vector<at::Tensor> flat = flat_views(grads);
  std::vector<WorkItem> items;
  for (const at::Tensor& g : flat) {
    if (!g.defined()) continue;
    void* data = g.data_ptr();
    const int64_t n = g.numel();
    for (int64_t b = 0; b < n; b += kItemElems) {
      items.push_back({data, b, std::min(n, b + kItemElems), g.scalar_type()});
    }
  }

  std::atomic<bool> found{false};
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t k = begin; k < end; ++k) {
      const WorkItem& item = items[k];
      switch (item.dtype) {
        case at::kFloat: bad |= process_item<float>(item, s, write); break;
        case at::kHalf: bad |= process_item<c10::Half>(item, s, write); break;
        case at::kBFloat16: bad |= process_item<c10::BFloat16>(item, s, write); break;
        default: TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", item.dtype);
      }
    }
    if (bad) found.store(true, std::memory_order_relaxed);
  });

  if (write) copy_back(grads, flat);
  if (found.load()) found_inf.fill_(1.0f);
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("unscale_and_check_", &deepseek_ext::ops::unscale_and_check_cpu);
}
