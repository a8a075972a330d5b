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
// The hidden units are cut into n_blocks blocks of block_size = d_ff / n_blocks
// units (say either n_blocks or block_size; given both, they must agree; with
// neither, n_blocks is 16); the first
// shared_blocks blocks are always computed (gate weight 1), and each token
// picks the top k = clamp(round(density * n_blocks), 1, n_blocks - shared_blocks)
// of the other (routed) blocks by gate score + balancing bias. A selected
// block's output is multiplied by its gate weight 2 * sigmoid(score) (1 at a
// zero score), so the gate learns through that product; with gate_weight = 0
// every block has weight 1, and at density 1 the module is the dense FFN.
// bias(false) leaves out b1 and b2 (undefined tensors, not registered).
//
// Load balancing (DeepSeek-V3's auxiliary-loss-free rule,
// https://arxiv.org/abs/2412.19437, section 2.1.2): a balancing bias (a
// buffer, never a weight) is added to the scores for the selection only. In
// training mode with balance_rate > 0, forward only counts how many
// (token, block) pairs each routed block received (load_counts(), int64, on
// the input's device); update_balance() then moves the bias
//   balance_bias += balance_rate * sign(mean(counts) - counts)
// and zeroes the counts. Call it once after each optimizer step:
//
//   loss.backward(); optimizer.step(); ffn->update_balance();
//
// The bias is not changed inside forward because a recomputation of the
// forward (activation checkpointing) must route exactly as the original
// forward did, and because the rule moves the bias once per optimizer step,
// over all of that step's micro-batches, not once per micro-batch. Everything
// stays on the device: no host synchronisation.

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
  // 0: not given. With neither n_blocks nor block_size, n_blocks is 16.
  TORCH_ARG(int64_t, n_blocks) = 0;
  TORCH_ARG(int64_t, block_size) = 0;
  TORCH_ARG(double, density) = 0.3;
  TORCH_ARG(int64_t, shared_blocks) = 0;
  // "gelu" (erf), "gelu_tanh" (tanh approximation), "silu" or "swiglu".
  TORCH_ARG(std::string, activation) = "gelu";
  TORCH_ARG(bool, bias) = true;
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
  // Per routed block, the (token, block) pairs it received in the training
  // forwards since the last update_balance() (int64 [n_blocks - shared_blocks],
  // on the device of the last input).
  const at::Tensor& load_counts() const { return load_counts_; }
  // balance_bias += balance_rate * sign(mean(c) - c) for c = load_counts(),
  // then zeroes the counts; nothing changes while every count is zero. On the
  // device, without a host synchronisation. Call after each optimizer step.
  void update_balance();

  int64_t n_blocks() const { return n_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t k() const { return k_; }

  GatedSparseFFNOptions options;
  at::Tensor w1, b1, w2, b2, gate_weight;  // parameters (b1, b2 undefined without bias)
  at::Tensor balance_bias;                  // buffer, float32 [n_blocks - shared_blocks]

 private:
  int64_t n_blocks_ = 0, block_size_ = 0, k_ = 0;
  at::Tensor aux_loss_, load_, load_counts_;
};

TORCH_MODULE(GatedSparseFFN);

}  // namespace nn
}  // namespace deepseek_ext
