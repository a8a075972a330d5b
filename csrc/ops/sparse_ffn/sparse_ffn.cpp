// Gated sparse FFN: the typed C++ entry points of sparse_ffn_route,
// sparse_ffn, sparse_ffn_backward, sparse_ffn_gather and sparse_ffn_combine,
// each a call through the dispatcher (the schemas are in ops/library.cpp, the
// kernels in cpu/sparse_ffn_cpu.cpp, cpu/sparse_ffn_permute_cpu.cpp,
// kernels/sparse_ffn.cu and kernels/sparse_ffn_permute.cu, autograd in
// sparse_ffn_autograd.cpp).

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

#include "deepseek_ext/ops.h"

namespace deepseek_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_ffn_route(const at::Tensor& scores,
                                                                const at::Tensor& bias, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::sparse_ffn_route", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(scores, bias, k);
}

std::tuple<at::Tensor, at::Tensor> sparse_ffn(const at::Tensor& x, const at::Tensor& w1,
                                              const std::optional<at::Tensor>& b1,
                                              const at::Tensor& w2, const at::Tensor& gate,
                                              const at::Tensor& order, const at::Tensor& offsets,
                                              int64_t block_size, c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::sparse_ffn", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, int64_t, c10::string_view)>();
  return op.call(x, w1, b1, w2, gate, order, offsets, block_size, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_ffn_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& gate, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, int64_t block_size, c10::string_view activation) {
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::sparse_ffn_backward", "")
                       .typed<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, int64_t,
                                  c10::string_view)>();
  return op.call(grad_out, x, w1, w2, gate, hidden, order, offsets, block_size, activation);
}

at::Tensor sparse_ffn_gather(const at::Tensor& x, const at::Tensor& order, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::sparse_ffn_gather", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, order, k);
}

at::Tensor sparse_ffn_combine(const at::Tensor& y, const at::Tensor& order, int64_t k,
                              const std::optional<at::Tensor>& gate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::sparse_ffn_combine", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                         const std::optional<at::Tensor>&)>();
  return op.call(y, order, k, gate);
}

}  // namespace deepseek_ext
