#pragma once
// Internal helpers shared by the CPU and CUDA kernels of update_scale_.

#include <ATen/core/Tensor.h>

#include "deepseek_ext/detail/loss_scale.h"

namespace deepseek_ext {
namespace ops {

// Checks the tensors and hyper-parameters of update_scale_ for a kernel of
// `device_type` and returns the parameters. Throws naming the argument.
amp::LossScaleParams check_update_scale_inputs(const at::Tensor& scale, const at::Tensor& growth_tracker,
                                               const at::Tensor& hysteresis_tracker,
                                               const at::Tensor& skip_counts, const at::Tensor& found_inf,
                                               double growth_factor, double backoff_factor,
                                               int64_t growth_interval, int64_t hysteresis, double min_scale,
                                               double max_scale, c10::DeviceType device_type);

}  // namespace ops
}  // namespace deepseek_ext
