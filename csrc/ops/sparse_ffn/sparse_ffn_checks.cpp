// Input validation of the gated sparse FFN ops, shared by the CPU and CUDA
// kernels: every check names the argument, what was expected and what came.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "sparse_ffn/sparse_ffn.h"

namespace deepseek_ext {
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
  if (activation == "gelu_tanh") return Activation::kGeluTanh;
  if (activation == "silu") return Activation::kSilu;
  if (activation == "swiglu") return Activation::kSwiglu;
  TORCH_CHECK(false,
              "activation must be \"gelu\", \"gelu_tanh\", \"silu\" or \"swiglu\", got \"",
              activation, "\"");
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

void check_gather_inputs(const at::Tensor& x, const at::Tensor& order, int64_t k,
                         c10::DeviceType device_type) {
  check_tensor(x, "x", device_type);
  check_tensor(order, "order", device_type);
  check_same_device(order, "order", x, "x");
  TORCH_CHECK(is_float_dtype(x.scalar_type()),
              "x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be a 2-D tensor [tokens, d_model], got shape ", x.sizes());
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1,
              "order must be a 1-D int64 tensor, got ", order.scalar_type(), " of shape ",
              order.sizes());
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
}

void check_combine_inputs(const at::Tensor& y, const at::Tensor& order, int64_t k,
                          const std::optional<at::Tensor>& gate, c10::DeviceType device_type) {
  check_tensor(y, "y", device_type);
  check_tensor(order, "order", device_type);
  check_same_device(order, "order", y, "y");
  TORCH_CHECK(is_float_dtype(y.scalar_type()),
              "y must be float32, float64, float16 or bfloat16, got ", y.scalar_type());
  TORCH_CHECK(y.dim() == 2, "y must be a 2-D tensor [tokens * k, d_model], got shape ", y.sizes());
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 &&
                  order.numel() == y.size(0),
              "order must be a 1-D int64 tensor of y.size(0) = ", y.size(0), " elements, got ",
              order.scalar_type(), " of shape ", order.sizes());
  TORCH_CHECK(k >= 1 && y.size(0) % k == 0, "k must be >= 1 and divide y.size(0) = ", y.size(0),
              ", got ", k);
  if (gate.has_value() && gate->defined()) {
    check_tensor(*gate, "gate", device_type);
    check_same_device(*gate, "gate", y, "y");
    TORCH_CHECK(gate->scalar_type() == y.scalar_type(), "gate must have y's dtype (",
                y.scalar_type(), "), got ", gate->scalar_type());
    TORCH_CHECK(gate->dim() == 2 && gate->size(0) == y.size(0) / k && gate->size(1) == k,
                "gate must be [tokens = ", y.size(0) / k, ", k = ", k, "], got shape ",
                gate->sizes());
  }
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

}  // namespace ops
}  // namespace deepseek_ext
