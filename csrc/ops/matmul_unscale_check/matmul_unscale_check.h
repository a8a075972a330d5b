#pragma once
// Internal helpers shared by the CPU and CUDA kernels of matmul_unscale_check.

#include <ATen/core/Tensor.h>

#include <optional>

namespace deepseek_ext {
namespace ops {

// Checks the arguments of matmul_unscale_check for a kernel of `device_type`
// and returns the output dtype (out_dtype, or the inputs' dtype when unset).
at::ScalarType check_matmul_unscale_check_inputs(const at::Tensor& a, const at::Tensor& b,
                                                 const at::Tensor& inv_scale, const at::Tensor& found_inf,
                                                 std::optional<at::ScalarType> out_dtype,
                                                 c10::DeviceType device_type);

}  // namespace ops
}  // namespace deepseek_ext
