#pragma once
// Typed C++ entry points of the deepseek_ext operators. Each one calls through
// the PyTorch dispatcher, so it reaches the CPU, CUDA or Meta kernel of its
// inputs exactly as `torch.ops.deepseek_ext.<op>` does from Python.

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace deepseek_ext {

// Multiplies every element of every tensor in `grads` in place by `inv_scale`
// and sets `found_inf` to 1.0 if any element was inf or NaN before the
// multiplication (it is never cleared). `grads` may mix float32, float16 and
// bfloat16 tensors; all tensors live on one device. When `inv_scale` holds
// exactly 1.0 the gradients are only read, never written.
//
// Drop-in for `at::_amp_foreach_non_finite_check_and_unscale_`.
//   grads:     tensors to unscale in place (float32 / float16 / bfloat16).
//   found_inf: 1-element float32 tensor on the grads' device.
//   inv_scale: 1-element float32 tensor on the grads' device.
void unscale_and_check_(at::TensorList grads, const at::Tensor& found_inf,
                        const at::Tensor& inv_scale);

}  // namespace deepseek_ext
