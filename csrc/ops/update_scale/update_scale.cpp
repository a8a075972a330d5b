// update_scale_: typed C++ entry point and input validation.

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "deepseek_ext/ops.h"
#include "update_scale/update_scale.h"

namespace deepseek_ext {

void update_scale_(const at::Tensor& scale, const at::Tensor& growth_tracker,
                   const at::Tensor& hysteresis_tracker, const at::Tensor& skip_counts,
                   const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                   int64_t growth_interval, int64_t hysteresis, double min_scale, double max_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::update_scale_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, double, double, int64_t,
                                   int64_t, double, double)>();
  op.call(scale, growth_tracker, hysteresis_tracker, skip_counts, found_inf, growth_factor,
          backoff_factor, growth_interval, hysteresis, min_scale, max_scale);
}

namespace ops {
namespace {

void check_state_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                        const at::Tensor& like, c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.device().type() == device_type, name, " must be a ", device_type,
              " tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " must be on the same device as scale (",
              like.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be a ", dtype, " tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " element(s), got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

bool is_finite_pow2(double x) {
  if (!(x > 0.0) || !std::isfinite(x)) return false;
  int e = 0;
  return std::frexp(x, &e) == 0.5;
}

}  // namespace

amp::LossScaleParams check_update_scale_inputs(const at::Tensor& scale, const at::Tensor& growth_tracker,
                                               const at::Tensor& hysteresis_tracker,
                                               const at::Tensor& skip_counts, const at::Tensor& found_inf,
                                               double growth_factor, double backoff_factor,
                                               int64_t growth_interval, int64_t hysteresis, double min_scale,
                                               double max_scale, c10::DeviceType device_type) {
  check_state_tensor(scale, "scale", at::kFloat, 1, scale, device_type);
  check_state_tensor(growth_tracker, "growth_tracker", at::kInt, 1, scale, device_type);
  check_state_tensor(hysteresis_tracker, "hysteresis_tracker", at::kInt, 1, scale, device_type);
  check_state_tensor(skip_counts, "skip_counts", at::kLong, 2, scale, device_type);
  check_state_tensor(found_inf, "found_inf", at::kFloat, 1, scale, device_type);
  // The scale stays a power of two, so the factors must be powers of two too.
  TORCH_CHECK(growth_factor > 1.0 && is_finite_pow2(growth_factor),
              "growth_factor must be a power of two > 1, got ", growth_factor);
  TORCH_CHECK(backoff_factor < 1.0 && is_finite_pow2(backoff_factor),
              "backoff_factor must be a power of two in (0, 1), got ", backoff_factor);
  TORCH_CHECK(growth_interval > 0 && growth_interval <= (int64_t{1} << 30),
              "growth_interval must be in [1, 2^30], got ", growth_interval);
  TORCH_CHECK(hysteresis > 0 && hysteresis <= (int64_t{1} << 30),
              "hysteresis must be in [1, 2^30], got ", hysteresis);
  TORCH_CHECK(is_finite_pow2(min_scale), "min_scale must be a finite power of two > 0, got ", min_scale);
  TORCH_CHECK(is_finite_pow2(max_scale) && max_scale <= std::ldexp(1.0, 127),
              "max_scale must be a power of two that float32 can hold, got ", max_scale);
  TORCH_CHECK(min_scale <= max_scale, "min_scale (", min_scale, ") must be <= max_scale (", max_scale, ")");
  return amp::LossScaleParams{static_cast<float>(growth_factor), static_cast<float>(backoff_factor),
                              growth_interval, hysteresis, static_cast<float>(min_scale),
                              static_cast<float>(max_scale)};
}

}  // namespace ops
}  // namespace deepseek_ext
