// deepseek_ext::amp::DynamicLossScaler: the C++ front end of the loss scaler.

#include "deepseek_ext/amp/dynamic_loss_scaler.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "deepseek_ext/ops.h"

namespace deepseek_ext {
namespace amp {

namespace {
bool is_pow2(double x) {
  int e = 0;
  return x > 0 && std::isfinite(x) && std::frexp(x, &e) == 0.5;
}
}  // namespace

DynamicLossScaler::DynamicLossScaler(DynamicLossScalerOptions options) : options_(options) {
  TORCH_CHECK(options_.growth_factor() > 1.0 && is_pow2(options_.growth_factor()),
              "growth_factor must be a power of two > 1, got ", options_.growth_factor());
  TORCH_CHECK(options_.backoff_factor() < 1.0 && is_pow2(options_.backoff_factor()),
              "backoff_factor must be a power of two in (0, 1), got ", options_.backoff_factor());
  TORCH_CHECK(options_.growth_interval() > 0, "growth_interval must be > 0, got ", options_.growth_interval());
  TORCH_CHECK(options_.hysteresis() > 0, "hysteresis must be > 0, got ", options_.hysteresis());
  TORCH_CHECK(is_pow2(options_.min_scale()), "min_scale must be a finite power of two, got ",
              options_.min_scale());
  TORCH_CHECK(is_pow2(options_.max_scale()), "max_scale must be a finite power of two, got ",
              options_.max_scale());
  TORCH_CHECK(options_.min_scale() <= options_.max_scale(), "min_scale must be <= max_scale");
  TORCH_CHECK(options_.init_scale() > 0 && std::isfinite(options_.init_scale()),
              "init_scale must be a finite number > 0, got ", options_.init_scale());
  const double clamped = std::min(std::max(options_.init_scale(), options_.min_scale()), options_.max_scale());
  options_.init_scale(std::exp2(std::floor(std::log2(clamped))));
}

void DynamicLossScaler::lazy_init(const at::Device& device) {
  if (scale_.defined()) return;
  const auto f32 = at::TensorOptions().device(device).dtype(at::kFloat);
  scale_ = at::full({1}, options_.init_scale(), f32);
  inv_scale_ = at::reciprocal(scale_);
  growth_tracker_ = at::zeros({1}, f32.dtype(at::kInt));
  hysteresis_tracker_ = at::full({1}, options_.hysteresis(), f32.dtype(at::kInt));
  skip_counts_ = at::zeros({2}, f32.dtype(at::kLong));
  found_inf_ = at::zeros({1}, f32);
}

at::Tensor DynamicLossScaler::scale(const at::Tensor& loss) {
  if (!options_.enabled()) return loss;
  lazy_init(loss.device());
  return loss.to(at::kFloat) * scale_.squeeze(0);  // 0-dim: keeps the loss a scalar
}

void DynamicLossScaler::unscale_(at::TensorList grads) {
  if (!options_.enabled()) return;
  TORCH_CHECK(scale_.defined(), "unscale_() called before scale(): no loss has been scaled yet");
  TORCH_CHECK(!unscaled_, "unscale_() has already been called since the last update()");
  deepseek_ext::unscale_and_check_(grads, found_inf_, inv_scale_);
  unscaled_ = true;
}

bool DynamicLossScaler::step(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled()) {
    optimizer.step();
    return true;
  }
  if (!unscaled_) {
    std::vector<at::Tensor> grads;
    for (const auto& group : optimizer.param_groups()) {
      for (const auto& p : group.params()) {
        if (p.grad().defined()) grads.push_back(p.grad());
      }
    }
    unscale_(grads);
  }
  if (found_inf_.item<float>() != 0.0f) return false;  // the one host read of a step
  optimizer.step();
  return true;
}

void DynamicLossScaler::update() {
  if (!options_.enabled() || !scale_.defined()) return;
  deepseek_ext::update_scale_(scale_, growth_tracker_, hysteresis_tracker_, skip_counts_, found_inf_,
                              options_.growth_factor(), options_.backoff_factor(), options_.growth_interval(),
                              options_.hysteresis(), options_.min_scale(), options_.max_scale());
  at::reciprocal_out(inv_scale_, scale_);
  found_inf_.zero_();
  unscaled_ = false;
}

double DynamicLossScaler::get_scale() const {
  if (!options_.enabled()) return 1.0;
  return scale_.defined() ? scale_.item<double>() : options_.init_scale();
}

}  // namespace amp
}  // namespace deepseek_ext
