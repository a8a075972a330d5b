// update_scale_ on the CPU: one step of the shared state machine.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "update_scale/update_scale.h"

namespace deepseek_ext {
namespace ops {
namespace {

void update_scale_cpu(const at::Tensor& scale, const at::Tensor& growth_tracker,
                      const at::Tensor& hysteresis_tracker, const at::Tensor& skip_counts,
                      const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                      int64_t growth_interval, int64_t hysteresis, double min_scale, double max_scale) {
  const amp::LossScaleParams p = check_update_scale_inputs(
      scale, growth_tracker, hysteresis_tracker, skip_counts, found_inf, growth_factor, backoff_factor,
      growth_interval, hysteresis, min_scale, max_scale, c10::DeviceType::CPU);
  amp::update_loss_scale_in_place(scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(),
                                  hysteresis_tracker.data_ptr<int32_t>(), skip_counts.data_ptr<int64_t>(),
                                  *found_inf.const_data_ptr<float>() != 0.0f, p);
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("update_scale_", &deepseek_ext::ops::update_scale_cpu);
}
