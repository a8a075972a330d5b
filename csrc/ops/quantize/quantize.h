#pragma once
// Internal helpers shared by the CPU and CUDA kernels of the int8 gradient
// quantisation ops (quantize_int8, quantize_int8_ef_, dequantize_int8,
// dequantize_reduce_int8). The math itself is in deepseek_ext/detail/int8_quant.h.

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace deepseek_ext {
namespace ops {

// ceil(n / block_size): the number of blocks (and scales) of n elements.
inline int64_t num_quant_blocks(int64_t n, int64_t block_size) {
  return (n + block_size - 1) / block_size;
}

// Each check throws a c10::Error naming the offending argument.
void check_block_size(int64_t block_size);

// x: strided float32/float16/bfloat16 on `device_type`; block_size valid; offset >= 0.
void check_quantize_inputs(const at::Tensor& x, int64_t block_size, int64_t offset,
                           c10::DeviceType device_type);

// As check_quantize_inputs, and residual: float32/bfloat16, x's device, x's numel.
void check_quantize_ef_inputs(const at::Tensor& x, const at::Tensor& residual, int64_t block_size,
                              int64_t offset, c10::DeviceType device_type);

// q: int8 with numel elements; scales: 1-D float32 with ceil(numel / block_size)
// elements on q's device; dtype float32/float16/bfloat16.
void check_dequantize_inputs(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                             at::ScalarType dtype, int64_t numel, c10::DeviceType device_type);

// q: [W, n] int8; scales: [W, ceil(n / block_size)] float32 on q's device;
// dtype float32/float16/bfloat16.
void check_dequantize_reduce_inputs(const at::Tensor& q, const at::Tensor& scales,
                                    int64_t block_size, at::ScalarType dtype,
                                    c10::DeviceType device_type);

}  // namespace ops
}  // namespace deepseek_ext
