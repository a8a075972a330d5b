// update_scale_ on CUDA: one thread runs one step of the shared state machine
// (detail/loss_scale.h), reading found_inf on the device: no host sync.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "deepseek_ext/detail/loss_scale.h"
#include "update_scale/update_scale.h"

namespace deepseek_ext {
namespace ops {
namespace {

__global__ void update_scale_kernel(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                    int64_t* skip_counts, const float* found_inf, amp::LossScaleParams p) {
  amp::update_loss_scale_in_place(scale, growth_tracker, hysteresis_tracker, skip_counts, *found_inf != 0.0f, p);
}

void update_scale_cuda(const at::Tensor& scale, const at::Tensor& growth_tracker,
                       const at::Tensor& hysteresis_tracker, const at::Tensor& skip_counts,
                       const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                       int64_t growth_interval, int64_t hysteresis, double min_scale, double max_scale) {
  const amp::LossScaleParams p = check_update_scale_inputs(
      scale, growth_tracker, hysteresis_tracker, skip_counts, found_inf, growth_factor, backoff_factor,
      growth_interval, hysteresis, min_scale, max_scale, c10::DeviceType::CUDA);
  const c10::cuda::OptionalCUDAGuard guard(scale.device());
  update_scale_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
      scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(), hysteresis_tracker.data_ptr<int32_t>(),
      skip_counts.data_ptr<int64_t>(), found_inf.const_data_ptr<float>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CUDA, m) {
  m.impl("update_scale_", &deepseek_ext::ops::update_scale_cuda);
}
