// Gated sparse FFN: typed C++ entry points, input validation, the activation
// helpers and the grouped-GEMM route shared by the device kernels, and the
// autograd kernel of sparse_ffn (its backward is the sparse_ffn_backward op).

#include "sparse_ffn/sparse_ffn.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/checks.h"
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

namespace ops {

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}


// A floating tensor of x's dtype and device.
void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x,
                  c10::DeviceType device_type) {
  check_tensor(t, name, device_type);
  check_same_device(t, name, x, "x");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype (", x.scalar_type(),
              "), got ", t.scalar_type());
}

}  // namespace

Activation parse_activation(std::string_view activation) {
  if (activation == "gelu") return Activation::kGelu;
  if (activation == "silu") return Activation::kSilu;
  if (activation == "swiglu") return Activation::kSwiglu;
  TORCH_CHECK(false, "activation must be \"gelu\", \"silu\" or \"swiglu\", got \"", activation,
              "\"");
}

at::Tensor activation_forward(const at::Tensor& a, Activation act, int64_t block_size) {
  switch (act) {
    case Activation::kGelu:
      return at::gelu(a);
    case Activation::kSilu:
      return at::silu(a);
    case Activation::kSwiglu:
      return at::silu(a.narrow(1, 0, block_size)).mul_(a.narrow(1, block_size, block_size));
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

at::Tensor activation_backward(const at::Tensor& dh, const at::Tensor& a, Activation act,
                               int64_t block_size) {
  switch (act) {
    case Activation::kGelu:
      return at::gelu_backward(dh, a);
    case Activation::kSilu:
      return at::silu_backward(dh, a);
    case Activation::kSwiglu: {
      const at::Tensor g = a.narrow(1, 0, block_size);
      const at::Tensor u = a.narrow(1, block_size, block_size);
      at::Tensor da = at::empty_like(a);
      // h = silu(g) * u: dg = silu'(g) * (dh * u), du = dh * silu(g).
      da.narrow(1, 0, block_size).copy_(at::silu_backward(dh * u, g));
      at::Tensor du = da.narrow(1, block_size, block_size);
      at::mul_out(du, dh, at::silu(g));
      return da;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

void check_route_inputs(const at::Tensor& scores, const at::Tensor& bias, int64_t k,
                        c10::DeviceType device_type) {
  check_tensor(scores, "scores", device_type);
  check_tensor(bias, "bias", device_type);
  check_same_device(bias, "bias", scores, "scores");
  TORCH_CHECK(scores.dim() == 2, "scores must be a 2-D tensor [tokens, n_blocks], got shape ",
              scores.sizes());
  TORCH_CHECK(is_float_dtype(scores.scalar_type()),
              "scores must be float32, float64, float16 or bfloat16, got ", scores.scalar_type());
  TORCH_CHECK(bias.scalar_type() == at::kFloat, "bias must be a float32 tensor, got ",
              bias.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == scores.size(1),
              "bias must be a 1-D tensor of n_blocks = ", scores.size(1),
              " elements (scores.size(1)), got shape ", bias.sizes());
  TORCH_CHECK(k >= 1 && k <= scores.size(1), "k must be in [1, n_blocks = ", scores.size(1),
              "], got ", k);
}

int64_t check_sparse_ffn_inputs(const at::Tensor& x, const at::Tensor& w1,
                                const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                const at::Tensor& gate, const at::Tensor& order,
                                const at::Tensor& offsets, int64_t block_size, Activation act,
                                c10::DeviceType device_type) {
  check_tensor(x, "x", device_type);
  TORCH_CHECK(is_float_dtype(x.scalar_type()),
              "x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be a 2-D tensor [tokens, d_model], got shape ", x.sizes());
  check_like_x(w1, "w1", x, device_type);
  check_like_x(w2, "w2", x, device_type);
  check_like_x(gate, "gate", x, device_type);
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  const int64_t d_model = x.size(1);
  const int64_t m = w1_rows_per_unit(act);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == d_model && w2.size(0) > 0 &&
                  w2.size(0) % block_size == 0,
              "w2 must be [n_blocks * block_size, d_model] with block_size = ", block_size,
              " and d_model = ", d_model, ", got shape ", w2.sizes());
  const int64_t n_blocks = w2.size(0) / block_size;
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == n_blocks * m * block_size && w1.size(1) == d_model,
              "w1 must be [", n_blocks * m * block_size, ", ", d_model,
              "] (n_blocks * ", m, " * block_size, d_model), got shape ", w1.sizes());
  if (b1.has_value() && b1->defined()) {
    check_like_x(*b1, "b1", x, device_type);
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == w1.size(0), "b1 must be a 1-D tensor of ",
                w1.size(0), " elements (w1.size(0)), got shape ", b1->sizes());
  }
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) >= 1 &&
                  gate.size(1) <= n_blocks,
              "gate must be [tokens = ", x.size(0), ", k] with 1 <= k <= n_blocks = ", n_blocks,
              ", got shape ", gate.sizes());
  check_tensor(order, "order", device_type);
  check_tensor(offsets, "offsets", device_type);
  check_same_device(order, "order", x, "x");
  check_same_device(offsets, "offsets", x, "x");
  TORCH_CHECK(order.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong,
              "order and offsets must be int64 tensors, got ", order.scalar_type(), " and ",
              offsets.scalar_type());
  TORCH_CHECK(order.dim() == 1 && order.numel() == gate.numel(),
              "order must be a 1-D tensor of tokens * k = ", gate.numel(),
              " elements, got shape ", order.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() == n_blocks + 1,
              "offsets must be a 1-D tensor of n_blocks + 1 = ", n_blocks + 1,
              " elements, got shape ", offsets.sizes());
  return n_blocks;
}

int64_t check_sparse_ffn_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& w1, const at::Tensor& w2,
                                         const at::Tensor& gate, const at::Tensor& hidden,
                                         const at::Tensor& order, const at::Tensor& offsets,
                                         int64_t block_size, Activation act,
                                         c10::DeviceType device_type) {
  const int64_t n_blocks = check_sparse_ffn_inputs(x, w1, std::nullopt, w2, gate, order, offsets,
                                                   block_size, act, device_type);
  check_like_x(grad_out, "grad_out", x, device_type);
  check_like_x(hidden, "hidden", x, device_type);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have x's shape ", x.sizes(),
              ", got ", grad_out.sizes());
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == gate.numel() && hidden.size(1) == mb,
              "hidden must be [tokens * k, ", mb, "] (sparse_ffn's second output), got shape ",
              hidden.sizes());
  return n_blocks;
}

// ---- the grouped-GEMM route (device-agnostic ATen; the CUDA kernels use it) ----
//
// Rows are the pairs in `order` (grouped by block); at::_grouped_mm takes the
// cumulative group ends as an int32 device tensor, so nothing is read by the
// host. Per-pair outputs are summed per token through the inverse permutation
// (k rows per token, no atomics: deterministic).

namespace {

struct Grouping {
  at::Tensor tok;   // [P] token of each sorted row
  at::Tensor pos;   // [P] sorted row of each pair p
  at::Tensor ends;  // [n_blocks] int32 cumulative ends
  at::Tensor blk;   // [P] block of each sorted row
};

Grouping make_grouping(const at::Tensor& order, const at::Tensor& offsets, int64_t k) {
  Grouping g;
  const int64_t P = order.numel();
  g.tok = at::div(order, k, "floor");
  at::Tensor rows = at::arange(P, order.options());
  g.pos = at::empty_like(order).index_copy_(0, order, rows);
  at::Tensor ends64 = offsets.slice(0, 1);
  g.ends = ends64.to(at::kInt);
  g.blk = at::searchsorted(ends64, rows, /*out_int32=*/false, /*right=*/true);
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_ffn_grouped(const at::Tensor& x, const at::Tensor& w1,
                                                      const std::optional<at::Tensor>& b1,
                                                      const at::Tensor& w2, const at::Tensor& gate,
                                                      const at::Tensor& order,
                                                      const at::Tensor& offsets,
                                                      int64_t block_size, Activation act) {
  const int64_t T = x.size(0), D = x.size(1), k = gate.size(1);
  const int64_t nb = offsets.numel() - 1;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  const Grouping g = make_grouping(order, offsets, k);
  const at::Tensor xs = x.index_select(0, g.tok);
  const at::Tensor gs = gate.reshape(-1).index_select(0, order).unsqueeze(1);
  at::Tensor a = at::_grouped_mm(xs, w1.view({nb, mb, D}).transpose(1, 2), g.ends);
  if (b1.has_value() && b1->defined()) a.add_(b1->view({nb, mb}).index_select(0, g.blk));
  const at::Tensor h = activation_forward(a, act, block_size).mul_(gs);
  const at::Tensor y = at::_grouped_mm(h, w2.view({nb, block_size, D}), g.ends);
  at::Tensor out = y.index_select(0, g.pos).view({T, k, D}).sum(1);
  return {out, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_ffn_backward_grouped(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& gate, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, int64_t block_size, Activation act) {
  const int64_t T = x.size(0), D = x.size(1), k = gate.size(1);
  const int64_t nb = offsets.numel() - 1;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  const Grouping g = make_grouping(order, offsets, k);
  const at::Tensor xs = x.index_select(0, g.tok);
  const at::Tensor gd = grad_out.index_select(0, g.tok);
  const at::Tensor gs = gate.reshape(-1).index_select(0, order).unsqueeze(1);
  const at::Tensor gh = at::_grouped_mm(gd, w2.view({nb, block_size, D}).transpose(1, 2), g.ends);
  const at::Tensor h = activation_forward(hidden, act, block_size);
  at::Tensor grad_gate = at::empty_like(gate).view(-1).index_copy_(0, order, (gh * h).sum(1));
  // Weight gradients: 2-D x 2-D grouped GEMMs, groups along the pair dimension.
  at::Tensor grad_w2 = at::_grouped_mm((h * gs).t(), gd, g.ends).view({nb * block_size, D});
  const at::Tensor da = activation_backward(gh * gs, hidden, act, block_size);
  at::Tensor grad_w1 = at::_grouped_mm(da.t(), xs, g.ends).view({nb * mb, D});
  at::Tensor grad_b1 = at::zeros({nb, mb}, da.options()).index_add_(0, g.blk, da).view(-1);
  const at::Tensor dxs = at::_grouped_mm(da, w1.view({nb, mb, D}), g.ends);
  at::Tensor grad_x = dxs.index_select(0, g.pos).view({T, k, D}).sum(1);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_gate.view({T, k})};
}

// ---- autograd ----

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
