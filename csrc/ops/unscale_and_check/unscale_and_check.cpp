// unscale_and_check_: typed C++ entry point and input validation.

#include "unscale_and_check/unscale_and_check.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "deepseek_ext/ops.h"

namespace deepseek_ext {

void unscale_and_check_(at::TensorList grads, const at::Tensor& found_inf,
                        const at::Tensor& inv_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::unscale_and_check_", "")
                       .typed<void(at::TensorList, const at::Tensor&, const at::Tensor&)>();
  // Validated before dispatch too, so that a tensor of another device in the list is
  // an error that names it, never a fault inside a kernel (the dispatcher picks one
  // kernel for the whole list).
  if (found_inf.defined()) {
    ops::check_unscale_and_check_inputs(grads, found_inf, inv_scale, found_inf.device().type());
  }
  op.call(grads, found_inf, inv_scale);
}

namespace ops {

namespace {

void check_scalar_tensor(const at::Tensor& t, const char* name, c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.device().type() == device_type, name, " must be a ", device_type,
              " tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be a float32 tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == 1, name, " must have exactly one element, got ", t.numel(),
              " (shape ", t.sizes(), ")");
}

}  // namespace

void check_unscale_and_check_inputs(at::TensorList grads, const at::Tensor& found_inf,
                                    const at::Tensor& inv_scale, c10::DeviceType device_type) {
  check_scalar_tensor(found_inf, "found_inf", device_type);
  check_scalar_tensor(inv_scale, "inv_scale", device_type);
  TORCH_CHECK(inv_scale.device() == found_inf.device(),
              "inv_scale must be on the same device as found_inf (", found_inf.device(),
              "), got ", inv_scale.device());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), "grads[", i, "] must be a defined tensor");
    TORCH_CHECK(g.layout() == at::kStrided, "grads[", i, "] must be a strided (dense) tensor, got ",
                g.layout());
    TORCH_CHECK(g.device() == found_inf.device(), "grads[", i,
                "] must be on the same device as found_inf (", found_inf.device(), "), got ",
                g.device());
    const auto dtype = g.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "grads[", i,
                "] must be float32, float16 or bfloat16, got ", dtype);
  }
}

std::vector<at::Tensor> flat_views(at::TensorList grads) {
  std::vector<at::Tensor> flat(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    if (g.numel() == 0) continue;
    flat[i] = g.is_non_overlapping_and_dense() ? g : g.contiguous();
  }
  return flat;
}

void copy_back(at::TensorList grads, const std::vector<at::Tensor>& flat) {
  TORCH_INTERNAL_ASSERT(grads.size() == flat.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (flat[i].defined() && !flat[i].is_same(grads[i])) grads[i].copy_(flat[i]);
  }
}

}  // namespace ops
}  // namespace deepseek_ext
