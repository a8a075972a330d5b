// matmul_unscale_check: typed C++ entry point and input validation.

#include "matmul_unscale_check/matmul_unscale_check.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "deepseek_ext/ops.h"

namespace deepseek_ext {

at::Tensor matmul_unscale_check(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                                const at::Tensor& found_inf, std::optional<at::ScalarType> out_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::matmul_unscale_check", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, std::optional<at::ScalarType>)>();
  return op.call(a, b, inv_scale, found_inf, out_dtype);
}

namespace ops {
namespace {

void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& a) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.device() == a.device(), name, " must be on the same device as a (", a.device(), "), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be a float32 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, name, " must have exactly one element, got ", t.numel());
}

}  // namespace

at::ScalarType check_matmul_unscale_check_inputs(const at::Tensor& a, const at::Tensor& b,
                                                 const at::Tensor& inv_scale, const at::Tensor& found_inf,
                                                 std::optional<at::ScalarType> out_dtype,
                                                 c10::DeviceType device_type) {
  TORCH_CHECK(a.defined() && b.defined(), "a and b must be defined tensors");
  TORCH_CHECK(a.device().type() == device_type, "a must be a ", device_type, " tensor, got ", a.device());
  TORCH_CHECK(b.device() == a.device(), "b must be on the same device as a (", a.device(), "), got ",
              b.device());
  TORCH_CHECK(a.dim() == 2, "a must be a 2-D matrix, got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "b must be a 2-D matrix, got shape ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), "a and b shapes cannot be multiplied: a is ", a.sizes(), ", b is ",
              b.sizes());
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "a must be float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(b.scalar_type() == dt, "b must have a's dtype (", dt, "), got ", b.scalar_type());
  check_scalar(inv_scale, "inv_scale", a);
  check_scalar(found_inf, "found_inf", a);
  const at::ScalarType out = out_dtype.value_or(dt);
  TORCH_CHECK(out == at::kFloat || out == dt, "out_dtype must be float32 or the inputs' dtype (", dt,
              "), got ", out);
  return out;
}

}  // namespace ops
}  // namespace deepseek_ext
