#pragma once
// Gated sparse FFN for LibTorch: the same module as the Python
// deepseek_ext.nn.GatedSparseFFN, on the same operators (sparse_ffn_route,
// sparse_ffn), with the same parameters, gate and balancing rule.
//
//   deepseek_ext::nn::GatedSparseFFN ffn(
//       deepseek_ext::nn::GatedSparseFFNOptions(512, 2048).density(0.3));
//   auto y = ffn->forward(x);                   // x [..., 512] -> [..., 512]
//   auto loss = task_loss(y) + ffn->aux_loss(); // zero unless aux_loss_weight > 0
//
// The hidden units are cut into n_blocks = d_ff / block_size blocks; the first
// shared_blocks blocks are always computed (gate weight 1), and each token
// picks the top k = clamp(round(density * n_blocks), 1, n_blocks - shared_blocks)
// of the other (routed) blocks by gate score + balancing bias. A selected
// block's output is multiplied by its gate weight 2 * sigmoid(score) (1 at a
// zero score), so the gate learns through that product. In training mode each
// forward nudges the balancing bias (a buffer, never a weight) on the device:
// bias += balance_rate * sign(mean_load - load), load = the fraction of the
// step's (token, block) pairs each routed block received.

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>

namespace deepseek_ext {
namespace nn {

struct GatedSparseFFNOptions {
  GatedSparseFFNOptions(int64_t d_model, int64_t d_ff) : d_model_(d_model), d_ff_(d_ff) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, d_ff);
  TORCH_ARG(int64_t, block_size) = 128;
  TORCH_ARG(double, density) = 0.3;
  TORCH_ARG(int64_t, shared_blocks) = 0;
  TORCH_ARG(std::string, activation) = "gelu";  // "gelu", "silu" or "swiglu"
  TORCH_ARG(double, balance_rate) = 1e-3;
  TORCH_ARG(double, aux_loss_weight) = 0.0;
};

class GatedSparseFFNImpl : public torch::nn::Cloneable<GatedSparseFFNImpl> {
 public:
  explicit GatedSparseFFNImpl(GatedSparseFFNOptions options);

  void reset() override;
  // x [..., d_model] -> [..., d_model].
  at::Tensor forward(const at::Tensor& x);

  // The auxiliary balance loss of the last forward (a scalar; zero when
  // aux_loss_weight == 0). Add it to the task loss yourself.
  const at::Tensor& aux_loss() const { return aux_loss_; }
  // Per routed block, the fraction of the last forward's pairs it received
  // (a device tensor: reading it is the caller's choice).
  const at::Tensor& block_load() const { return load_; }

  int64_t n_blocks() const { return n_blocks_; }
  int64_t k() const { return k_; }

  GatedSparseFFNOptions options;
  at::Tensor w1, b1, w2, b2, gate_weight;  // parameters
  at::Tensor balance_bias;                  // buffer, float32 [n_blocks - shared_blocks]

 private:
  int64_t n_blocks_ = 0, k_ = 0;
  at::Tensor aux_loss_, load_;
};

TORCH_MODULE(GatedSparseFFN);

}  // namespace nn
}  // namespace deepseek_ext
