// int8 gradient quantisation: typed C++ entry points and input validation.

#include "quantize/quantize.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "deepseek_ext/detail/int8_quant.h"
#include "common/checks.h"
#include "deepseek_ext/ops.h"

namespace deepseek_ext {

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x, int64_t block_size,
                                                 bool stochastic, int64_t seed, int64_t offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::quantize_int8", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool,
                                                                 int64_t, int64_t)>();
  return op.call(x, block_size, stochastic, seed, offset);
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_ef_(const at::Tensor& x,
                                                     const at::Tensor& residual,
                                                     int64_t block_size, bool stochastic,
                                                     int64_t seed, int64_t offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::quantize_int8_ef_", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, int64_t, bool, int64_t, int64_t)>();
  return op.call(x, residual, block_size, stochastic, seed, offset);
}

at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                           at::ScalarType dtype, int64_t numel) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::dequantize_int8", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                         at::ScalarType, int64_t)>();
  return op.call(q, scales, block_size, dtype, numel);
}

at::Tensor dequantize_reduce_int8(const at::Tensor& q, const at::Tensor& scales,
                                  int64_t block_size, double multiplier, at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::dequantize_reduce_int8", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double,
                                         at::ScalarType)>();
  return op.call(q, scales, block_size, multiplier, dtype);
}

namespace ops {

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}


}  // namespace

void check_block_size(int64_t block_size) {
  TORCH_CHECK(block_size > 0 && block_size % int8q::kBlockMultiple == 0 &&
                  block_size <= int8q::kMaxBlockSize,
              "block_size must be a positive multiple of ", int8q::kBlockMultiple, " up to ",
              int8q::kMaxBlockSize, ", got ", block_size);
}

void check_quantize_inputs(const at::Tensor& x, int64_t block_size, int64_t offset,
                           c10::DeviceType device_type) {
  check_tensor(x, "x", device_type);
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  check_block_size(block_size);
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
}

void check_quantize_ef_inputs(const at::Tensor& x, const at::Tensor& residual, int64_t block_size,
                              int64_t offset, c10::DeviceType device_type) {
  check_quantize_inputs(x, block_size, offset, device_type);
  check_same_device(residual, "residual", x, "x");  // first: names both devices
  check_tensor(residual, "residual", device_type);
  TORCH_CHECK(residual.scalar_type() == at::kFloat || residual.scalar_type() == at::kBFloat16,
              "residual must be float32 or bfloat16, got ", residual.scalar_type());
  TORCH_CHECK(residual.numel() == x.numel(), "residual must have as many elements as x (",
              x.numel(), "), got ", residual.numel(), " (shape ", residual.sizes(), ")");
}

// What both dequantize ops ask of (q, scales), block_size and the output dtype.
static void check_quantized_pair(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                                 at::ScalarType dtype, c10::DeviceType device_type) {
  check_tensor(q, "q", device_type);
  check_same_device(scales, "scales", q, "q");  // first: names both devices
  check_tensor(scales, "scales", device_type);
  TORCH_CHECK(q.scalar_type() == at::kChar, "q must be an int8 tensor, got ", q.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales must be a float32 tensor, got ",
              scales.scalar_type());
  check_block_size(block_size);
  TORCH_CHECK(is_float_dtype(dtype), "dtype must be float32, float16 or bfloat16, got ", dtype);
}

void check_dequantize_inputs(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                             at::ScalarType dtype, int64_t numel, c10::DeviceType device_type) {
  check_quantized_pair(q, scales, block_size, dtype, device_type);
  TORCH_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
  TORCH_CHECK(q.numel() == numel, "q must have numel = ", numel, " elements, got ", q.numel(),
              " (shape ", q.sizes(), ")");
  const int64_t nblocks = num_quant_blocks(numel, block_size);
  TORCH_CHECK(scales.dim() == 1 && scales.numel() == nblocks,
              "scales must be a 1-D tensor of ceil(numel / block_size) = ", nblocks,
              " elements, got shape ", scales.sizes());
}

void check_dequantize_reduce_inputs(const at::Tensor& q, const at::Tensor& scales,
                                    int64_t block_size, at::ScalarType dtype,
                                    c10::DeviceType device_type) {
  check_quantized_pair(q, scales, block_size, dtype, device_type);
  TORCH_CHECK(q.dim() == 2, "q must be a 2-D tensor [world_size, n], got shape ", q.sizes());
  const int64_t nblocks = num_quant_blocks(q.size(1), block_size);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == q.size(0) && scales.size(1) == nblocks,
              "scales must have shape [", q.size(0), ", ", nblocks,
              "] (q's world_size, ceil(n / block_size)), got ", scales.sizes());
}

}  // namespace ops
}  // namespace deepseek_ext
