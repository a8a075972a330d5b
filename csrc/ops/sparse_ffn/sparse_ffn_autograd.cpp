// Autograd kernel of sparse_ffn: the forward op run below the autograd key,
// its backward through the sparse_ffn_backward op.

#include <ATen/core/Tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "deepseek_ext/ops.h"

namespace deepseek_ext {
namespace ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SparseFFNFunction : public torch::autograd::Function<SparseFFNFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                               const at::Tensor& gate, const at::Tensor& order,
                               const at::Tensor& offsets, int64_t block_size,
                               c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hidden] =
        deepseek_ext::sparse_ffn(x, w1, b1, w2, gate, order, offsets, block_size, activation);
    ctx->save_for_backward({x, w1, w2, gate, hidden, order, offsets});
    ctx->saved_data["block_size"] = block_size;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_b1"] = b1.has_value() && b1->defined();
    ctx->mark_non_differentiable({hidden});
    return {out, hidden};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    at::Tensor grad_out = grad_outputs[0];
    if (!grad_out.defined()) grad_out = at::zeros_like(x);
    auto [gx, gw1, gb1, gw2, ggate] = deepseek_ext::sparse_ffn_backward(
        grad_out.contiguous(), x, saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
        ctx->saved_data["block_size"].toInt(), ctx->saved_data["activation"].toStringRef());
    if (!ctx->saved_data["has_b1"].toBool()) gb1 = at::Tensor();
    return {gx, gw1, gb1, gw2, ggate, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> sparse_ffn_autograd(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const at::Tensor& gate, const at::Tensor& order,
    const at::Tensor& offsets, int64_t block_size, c10::string_view activation) {
  auto result =
      SparseFFNFunction::apply(x, w1, b1, w2, gate, order, offsets, block_size, activation);
  return {result[0], result[1]};
}

}  // namespace

}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, Autograd, m) {
  m.impl("sparse_ffn", &deepseek_ext::ops::sparse_ffn_autograd);
}
