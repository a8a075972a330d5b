#pragma once
// Internal helpers shared by the CPU and CUDA kernels of unscale_and_check_.

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace deepseek_ext {
namespace ops {

// Checks the arguments of unscale_and_check_ for a kernel of `device_type`:
// found_inf and inv_scale are 1-element float32 tensors, every grad is a
// strided float32/float16/bfloat16 tensor on found_inf's device. Throws a
// c10::Error naming the offending argument.
void check_unscale_and_check_inputs(at::TensorList grads, const at::Tensor& found_inf,
                                    const at::Tensor& inv_scale, c10::DeviceType device_type);

// For each grad, a tensor whose elements the kernels may treat as one flat
// array of numel() values starting at data_ptr(): the grad itself when its
// elements fill a dense, non-overlapping range (contiguous, transposed,
// permuted...), else a contiguous copy. Empty grads map to undefined tensors.
std::vector<at::Tensor> flat_views(at::TensorList grads);

// Writes the copies made by flat_views() back into their grads.
void copy_back(at::TensorList grads, const std::vector<at::Tensor>& flat);

}  // namespace ops
}  // namespace deepseek_ext
