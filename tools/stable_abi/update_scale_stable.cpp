// update_scale_ (the dynamic loss scaler's step) written against torch's stable
// ABI: torch::stable::Tensor, STABLE_TORCH_LIBRARY and the header-only
// utilities, no ATen or c10 symbol. The same state machine as the library's op
// (deepseek_ext/detail/loss_scale.h); registered as dsx_stable::update_scale_.
// tools/stable_abi/measure.py builds it against one torch (with
// TORCH_TARGET_VERSION = that torch) and loads it under another; see
// docs/building.md (the stable ABI section).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "deepseek_ext/detail/loss_scale.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

void check_state(const Tensor& t, const char* name, ScalarType dtype, int64_t numel) {
  STD_TORCH_CHECK(t.is_cpu(), name, " must be a CPU tensor");
  STD_TORCH_CHECK(t.scalar_type() == dtype, name, " has the wrong dtype");
  STD_TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " element(s), got ", t.numel());
  STD_TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

bool is_finite_pow2(double x) {
  if (!(x > 0.0) || !std::isfinite(x)) return false;
  int e = 0;
  return std::frexp(x, &e) == 0.5;
}

void update_scale_stable(Tensor scale, Tensor growth_tracker, Tensor hysteresis_tracker, Tensor skip_counts,
                         Tensor found_inf, double growth_factor, double backoff_factor, int64_t growth_interval,
                         int64_t hysteresis, double min_scale, double max_scale) {
  check_state(scale, "scale", ScalarType::Float, 1);
  check_state(growth_tracker, "growth_tracker", ScalarType::Int, 1);
  check_state(hysteresis_tracker, "hysteresis_tracker", ScalarType::Int, 1);
  check_state(skip_counts, "skip_counts", ScalarType::Long, 2);
  check_state(found_inf, "found_inf", ScalarType::Float, 1);
  STD_TORCH_CHECK(growth_factor > 1.0 && is_finite_pow2(growth_factor), "growth_factor must be a power of two > 1");
  STD_TORCH_CHECK(backoff_factor < 1.0 && is_finite_pow2(backoff_factor),
                  "backoff_factor must be a power of two in (0, 1)");
  STD_TORCH_CHECK(growth_interval > 0 && hysteresis > 0, "growth_interval and hysteresis must be > 0");
  STD_TORCH_CHECK(is_finite_pow2(min_scale) && is_finite_pow2(max_scale) && min_scale <= max_scale,
                  "min_scale and max_scale must be powers of two, min_scale <= max_scale");
  const deepseek_ext::amp::LossScaleParams p{static_cast<float>(growth_factor), static_cast<float>(backoff_factor),
                                             growth_interval, hysteresis, static_cast<float>(min_scale),
                                             static_cast<float>(max_scale)};
  deepseek_ext::amp::update_loss_scale_in_place(
      static_cast<float*>(scale.mutable_data_ptr()), static_cast<int32_t*>(growth_tracker.mutable_data_ptr()),
      static_cast<int32_t*>(hysteresis_tracker.mutable_data_ptr()),
      static_cast<int64_t*>(skip_counts.mutable_data_ptr()),
      *static_cast<const float*>(found_inf.const_data_ptr()) != 0.0f, p);
}

}  // namespace

STABLE_TORCH_LIBRARY(dsx_stable, m) {
  m.def("update_scale_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor(c!) hysteresis_tracker, "
        "Tensor(d!) skip_counts, Tensor found_inf, float growth_factor, float backoff_factor, "
        "int growth_interval, int hysteresis, float min_scale, float max_scale) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(dsx_stable, CPU, m) {
  m.impl("update_scale_", TORCH_BOX(&update_scale_stable));
}
