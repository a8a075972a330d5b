// The LibTorch GatedSparseFFN module (see deepseek_ext/nn/gated_sparse_ffn.h).

#include "deepseek_ext/nn/gated_sparse_ffn.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cmath>
#include <optional>
#include <vector>

#include "deepseek_ext/ops.h"

namespace deepseek_ext {
namespace nn {

namespace {

// The block count when neither n_blocks nor block_size is given (as
// DEFAULT_N_BLOCKS in the Python module).
constexpr int64_t kDefaultNBlocks = 16;

int64_t units_per_row(const std::string& activation) { return activation == "swiglu" ? 2 : 1; }

// act over whole blocks: a [T, S * m * block_size] -> [T, S * block_size].
at::Tensor dense_blocks_activation(const at::Tensor& a, const std::string& activation,
                                   int64_t block_size) {
  if (activation == "gelu") return at::gelu(a);
  if (activation == "gelu_tanh") return at::gelu(a, "tanh");
  if (activation == "silu") return at::silu(a);
  const at::Tensor v = a.view({a.size(0), -1, 2, block_size});
  return (at::silu(v.select(2, 0)) * v.select(2, 1)).reshape({a.size(0), -1});
}

}  // namespace

GatedSparseFFNImpl::GatedSparseFFNImpl(GatedSparseFFNOptions options_) : options(std::move(options_)) {
  reset();
}

void GatedSparseFFNImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.d_model() > 0, "d_model must be positive, got ", o.d_model());
  TORCH_CHECK(o.d_ff() > 0, "d_ff must be positive, got ", o.d_ff());
  TORCH_CHECK(o.n_blocks() >= 0, "n_blocks must be positive, got ", o.n_blocks());
  TORCH_CHECK(o.block_size() >= 0, "block_size must be positive, got ", o.block_size());
  if (o.block_size() > 0 && o.n_blocks() == 0) {
    block_size_ = o.block_size();
    TORCH_CHECK(o.d_ff() % block_size_ == 0, "block_size must divide d_ff: d_ff = ", o.d_ff(),
                ", block_size = ", block_size_);
    n_blocks_ = o.d_ff() / block_size_;
  } else {
    n_blocks_ = o.n_blocks() > 0 ? o.n_blocks() : kDefaultNBlocks;
    TORCH_CHECK(o.d_ff() % n_blocks_ == 0, "n_blocks must divide d_ff: d_ff = ", o.d_ff(),
                ", n_blocks = ", n_blocks_);
    TORCH_CHECK(o.block_size() == 0 || o.block_size() * n_blocks_ == o.d_ff(),
                "n_blocks and block_size disagree: n_blocks * block_size must equal d_ff = ",
                o.d_ff(), ", got n_blocks = ", n_blocks_, ", block_size = ", o.block_size());
    block_size_ = o.d_ff() / n_blocks_;
  }
  TORCH_CHECK(o.density() > 0.0 && o.density() <= 1.0, "density must be in (0, 1], got ",
              o.density());
  TORCH_CHECK(o.activation() == "gelu" || o.activation() == "gelu_tanh" ||
                  o.activation() == "silu" || o.activation() == "swiglu",
              "activation must be \"gelu\", \"gelu_tanh\", \"silu\" or \"swiglu\", got \"",
              o.activation(), "\"");
  TORCH_CHECK(o.shared_blocks() >= 0 && o.shared_blocks() < n_blocks_,
              "shared_blocks must be in [0, n_blocks = ", n_blocks_, "), got ", o.shared_blocks());
  const int64_t routed = n_blocks_ - o.shared_blocks();
  k_ = std::min<int64_t>(std::max<int64_t>(std::llround(o.density() * n_blocks_), 1), routed);
  TORCH_CHECK(o.balance_rate() >= 0.0, "balance_rate must be >= 0, got ", o.balance_rate());
  TORCH_CHECK(o.aux_loss_weight() >= 0.0, "aux_loss_weight must be >= 0, got ",
              o.aux_loss_weight());

  const int64_t m = units_per_row(o.activation());
  // nn.Linear's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  const double b_in = 1.0 / std::sqrt(static_cast<double>(o.d_model()));
  const double b_hid = 1.0 / std::sqrt(static_cast<double>(o.d_ff()));
  w1 = register_parameter("w1", torch::empty({o.d_ff() * m, o.d_model()}).uniform_(-b_in, b_in));
  if (o.bias()) {
    b1 = register_parameter("b1", torch::empty({o.d_ff() * m}).uniform_(-b_in, b_in));
  } else {
    b1 = at::Tensor();
    b2 = at::Tensor();
  }
  w2 = register_parameter("w2", torch::empty({o.d_ff(), o.d_model()}).uniform_(-b_hid, b_hid));
  if (o.bias()) {
    b2 = register_parameter("b2", torch::empty({o.d_model()}).uniform_(-b_hid, b_hid));
  }
  gate_weight = register_parameter("gate_weight",
                                   torch::empty({routed, o.d_model()}).uniform_(-b_in, b_in));
  balance_bias = register_buffer("balance_bias", torch::zeros({routed}));
  load_ = torch::zeros({routed});
  load_counts_ = torch::zeros({routed}, torch::kLong);
  aux_loss_ = torch::zeros({});
}

at::Tensor GatedSparseFFNImpl::forward(const at::Tensor& x) {
  const auto& o = options;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == o.d_model(), "x must have shape [..., d_model = ",
              o.d_model(), "], got ", x.sizes());
  const int64_t bs = block_size_, S = o.shared_blocks(), m = units_per_row(o.activation());
  const at::Tensor x2 = x.reshape({-1, o.d_model()});
  const int64_t T = x2.size(0);

  // Module::to(dtype) converts buffers too; the balancing bias stays float32.
  if (balance_bias.scalar_type() != at::kFloat) balance_bias.set_data(balance_bias.to(at::kFloat));
  const at::Tensor scores = at::linear(x2, gate_weight);
  auto [idx, order, offsets] = sparse_ffn_route(scores.detach().to(at::kFloat), balance_bias, k_);
  const at::Tensor gate = at::sigmoid(scores).gather(1, idx).mul(2.0);

  const auto rows = [](const at::Tensor& t, int64_t start) {
    return start == 0 || !t.defined() ? t : t.narrow(0, start, t.size(0) - start);
  };
  const std::optional<at::Tensor> routed_b1 =
      b1.defined() ? std::optional<at::Tensor>(rows(b1, S * m * bs)) : std::nullopt;
  auto [out, hidden] = sparse_ffn(x2, rows(w1, S * m * bs), routed_b1, rows(w2, S * bs), gate,
                                  order, offsets, bs, o.activation());
  if (S > 0) {
    const at::Tensor a = at::linear(x2, w1.narrow(0, 0, S * m * bs),
                                    b1.defined() ? b1.narrow(0, 0, S * m * bs) : at::Tensor());
    out = out + at::matmul(dense_blocks_activation(a, o.activation(), bs), w2.narrow(0, 0, S * bs));
  }
  if (b2.defined()) out = out + b2;

  const int64_t routed = n_blocks_ - S;
  const at::Tensor counts = offsets.slice(0, 1) - offsets.slice(0, 0, routed);
  load_ = counts.to(at::kFloat).div_(static_cast<double>(std::max<int64_t>(T * k_, 1)));
  if (is_training() && o.balance_rate() > 0.0) {
    // Counted here, applied by update_balance(): see the header.
    if (load_counts_.device() != counts.device()) {
      load_counts_ = at::zeros({routed}, counts.options().dtype(at::kLong));
    }
    load_counts_.add_(counts);
  }
  if (o.aux_loss_weight() > 0.0 && T > 0) {
    // DeepSeek-V3's balance loss: sum_b f_b * P_b, f_b = load_b * n_routed,
    // P_b = the mean over tokens of the normalised affinity sigmoid(s_b) / sum sigmoid(s).
    const at::Tensor aff = at::sigmoid(scores.to(at::kFloat));
    const at::Tensor p = (aff / aff.sum(1, true)).mean(0);
    aux_loss_ = (load_ * static_cast<double>(routed) * p).sum() * o.aux_loss_weight();
  } else {
    aux_loss_ = at::zeros({}, x.options().dtype(at::kFloat));
  }
  auto shape = x.sizes().vec();
  return out.view(shape);
}

void GatedSparseFFNImpl::update_balance() {
  at::NoGradGuard no_grad;
  const at::Tensor c = load_counts_.to(at::kDouble);
  // sign(mean - c) is zero everywhere when the counts are all equal (all zero
  // among them), so an update without counts leaves the bias alone.
  const at::Tensor step = at::sign(c.mean() - c).to(balance_bias.device(), at::kFloat);
  balance_bias.add_(step, options.balance_rate());
  load_counts_.zero_();
}

}  // namespace nn
}  // namespace deepseek_ext
