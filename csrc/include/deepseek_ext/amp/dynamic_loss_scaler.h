#pragma once
// Dynamic loss scaling for LibTorch training loops, with the semantics of the
// Python deepseek_ext.amp.DynamicLossScaler: the state lives on the device and
// is advanced by the same operators (unscale_and_check_, update_scale_), so
// both front ends run one implementation of the rule.
//
//   deepseek_ext::amp::DynamicLossScaler scaler(
//       deepseek_ext::amp::DynamicLossScalerOptions().hysteresis(2));
//   scaler.scale(loss).backward();
//   scaler.step(optimizer);   // unscale + check, step unless inf/NaN (one host read)
//   scaler.update();          // on the device

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/optim/optimizer.h>

#include <optional>
#include <vector>

namespace deepseek_ext {
namespace amp {

struct DynamicLossScalerOptions {
  TORCH_ARG(double, init_scale) = 65536.0;
  TORCH_ARG(double, growth_factor) = 2.0;
  TORCH_ARG(double, backoff_factor) = 0.5;
  TORCH_ARG(int64_t, growth_interval) = 2000;
  TORCH_ARG(int64_t, hysteresis) = 1;
  TORCH_ARG(double, min_scale) = 1.0;
  TORCH_ARG(double, max_scale) = 16777216.0;  // 2^24
  TORCH_ARG(bool, enabled) = true;
};

class DynamicLossScaler {
 public:
  explicit DynamicLossScaler(DynamicLossScalerOptions options = {});

  // loss * scale (in float32). The state is created on loss's device.
  at::Tensor scale(const at::Tensor& loss);
  // Multiplies the gradients by 1/scale in place and records inf/NaN, in one pass.
  void unscale_(at::TensorList grads);
  // Unscales the optimizer's gradients (unless unscale_ ran already), then
  // steps it unless they held inf/NaN. Reads found_inf once (the one host sync).
  // Returns whether the optimizer stepped.
  bool step(torch::optim::Optimizer& optimizer);
  // Advances the scale on the device and starts the next step.
  void update();

  bool is_enabled() const { return options_.enabled(); }
  double get_scale() const;  // reads the device
  const at::Tensor& scale_tensor() const { return scale_; }
  const at::Tensor& found_inf() const { return found_inf_; }
  // int64[2] on the device: consecutive and total skipped steps (no sync).
  const at::Tensor& skip_counts() const { return skip_counts_; }
  const DynamicLossScalerOptions& options() const { return options_; }

 private:
  void lazy_init(const at::Device& device);

  DynamicLossScalerOptions options_;
  at::Tensor scale_, inv_scale_, growth_tracker_, hysteresis_tracker_, skip_counts_, found_inf_;
  bool unscaled_ = false;
};

}  // namespace amp
}  // namespace deepseek_ext
