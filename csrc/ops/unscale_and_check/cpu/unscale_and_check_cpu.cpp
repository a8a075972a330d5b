// unscale_and_check_ on the CPU: one parallel pass over every gradient.
//
// The list is cut into work items of at most kItemElems elements (small
// tensors are one item each), and at::parallel_for spreads the items over the
// threads. Each item is checked for inf/NaN on its raw bits (a vectorised
// integer max, see detail/float_bits.h) and, unless inv_scale is exactly 1,
// multiplied in place with at::vec::Vectorized in float arithmetic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "deepseek_ext/detail/float_bits.h"
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

template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> {
  using format = bits::Fp32Format;
};
template <>
struct BitsOf<c10::Half> {
  using format = bits::Fp16Format;
};
template <>
struct BitsOf<c10::BFloat16> {
  using format = bits::Bf16Format;
};

// Returns true if data[0, n) holds an inf or NaN.
template <typename scalar_t>
bool has_nonfinite(const scalar_t* data, int64_t n) {
  using Format = typename BitsOf<scalar_t>::format;
  // Magnitude bits are < 2^31 (fp32) or < 2^15 (16-bit), so a signed max works.
  using ibits_t = std::make_signed_t<typename Format::bits_type>;
  using IVec = Vectorized<ibits_t>;
  const auto* bits = reinterpret_cast<const ibits_t*>(data);
  const IVec mask(static_cast<ibits_t>(Format::kMagnitudeMask));
  IVec acc(0);
  int64_t i = 0;
  for (; i + IVec::size() <= n; i += IVec::size()) {
    acc = at::vec::maximum(acc, IVec::loadu(bits + i) & mask);
  }
  ibits_t lanes[IVec::size()];
  acc.store(lanes);
  ibits_t m = 0;
  for (int64_t l = 0; l < IVec::size(); ++l) m = lanes[l] > m ? lanes[l] : m;
  for (; i < n; ++i) {
    const ibits_t v = static_cast<ibits_t>(bits[i] & static_cast<ibits_t>(Format::kMagnitudeMask));
    m = v > m ? v : m;
  }
  return bits::max_magnitude_is_nonfinite<Format>(
      static_cast<typename Format::bits_type>(m));
}

void scale_inplace(float* data, int64_t n, float s) {
  using FVec = Vectorized<float>;
  const FVec sv(s);
  int64_t i = 0;
  for (; i + FVec::size() <= n; i += FVec::size()) {
    (FVec::loadu(data + i) * sv).store(data + i);
  }
  for (; i < n; ++i) data[i] = data[i] * s;
}

template <typename half_t>  // c10::Half or c10::BFloat16
void scale_inplace(half_t* data, int64_t n, float s) {
  using HVec = Vectorized<half_t>;
  using FVec = Vectorized<float>;
  const FVec sv(s);
  int64_t i = 0;
  for (; i + HVec::size() <= n; i += HVec::size()) {
    auto [lo, hi] = at::vec::convert_to_float<half_t>(HVec::loadu(data + i));
    at::vec::convert_from_float<half_t>(lo * sv, hi * sv).store(data + i);
  }
  for (; i < n; ++i) data[i] = static_cast<half_t>(static_cast<float>(data[i]) * s);
}

template <typename scalar_t>
bool process_item(const WorkItem& item, float inv_scale, bool write) {
  auto* p = static_cast<scalar_t*>(item.data) + item.begin;
  const int64_t n = item.end - item.begin;
  const bool bad = has_nonfinite(p, n);
  if (write) scale_inplace(p, n, inv_scale);
  return bad;
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
