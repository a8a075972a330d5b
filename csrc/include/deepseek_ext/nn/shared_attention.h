#pragma once
// Shared-attention layers for LibTorch: an attention module with a fused QKV
// projection, and a pre-norm transformer whose attention (and optionally FFN)
// parameters are shared across layers by a plan (Takase & Kiyono's sequence /
// cycle / cycle-reverse, or all layers), with an optional ALBERT-style
// factorised embedding. The attention math is the deepseek_ext::shared_attention
// op, the one the Python modules deepseek_ext.nn.SharedAttention /
// SharedAttentionTransformer call.
//
//   auto model = deepseek_ext::nn::SharedAttentionTransformer(
//       deepseek_ext::nn::SharedAttentionTransformerOptions(30522, 768, 12, 12, 3072, 512)
//           .sharing("all").embed_dim(128));
//   torch::optim::Adam opt(model->parameters());    // each shared tensor once
//   auto logits = model(tokens);                     // [B, T] int64 -> [B, T, vocab]

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace deepseek_ext {
namespace nn {

// ---- SharedAttention ----

struct SharedAttentionOptions {
  SharedAttentionOptions(int64_t d_model, int64_t n_heads) : d_model_(d_model), n_heads_(n_heads) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, n_heads);
  // Key/value heads (grouped-query attention); 0 means n_heads.
  TORCH_ARG(int64_t, n_kv_heads) = 0;
  // Attention-probability dropout, applied in training mode only.
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, bias) = true;
};

// Parameters: qkv_weight [(n_heads + 2 n_kv_heads) head_dim, d_model],
// qkv_bias, out_weight [d_model, d_model], out_bias (biases when options.bias).
// Initialised as torch::nn::Linear layers with the same shapes.
class SharedAttentionImpl : public torch::nn::Cloneable<SharedAttentionImpl> {
 public:
  SharedAttentionImpl(int64_t d_model, int64_t n_heads)
      : SharedAttentionImpl(SharedAttentionOptions(d_model, n_heads)) {}
  explicit SharedAttentionImpl(const SharedAttentionOptions& options);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // x [B, T, d_model] -> [B, T, d_model]. key_padding_mask: bool [B, T], True = padding.
  at::Tensor forward(const at::Tensor& x, bool causal = false,
                     const std::optional<at::Tensor>& key_padding_mask = std::nullopt);

  int64_t n_kv_heads() const;
  int64_t head_dim() const { return options.d_model() / options.n_heads(); }

  SharedAttentionOptions options;
  at::Tensor qkv_weight, qkv_bias, out_weight, out_bias;
};
TORCH_MODULE(SharedAttention);

// ---- Sharing plans ----

// Which unique module each of n_layers layers uses, with M = n_unique modules:
//   None          layer i -> i                      (M = n_layers)
//   All           layer i -> 0                      (M = 1)
//   Sequence      layer i -> floor(i M / n_layers)  (runs of n_layers / M consecutive layers)
//   Cycle         layer i -> i mod M                (0 1 2 0 1 2 ...)
//   CycleReverse  cycle for the first n_layers - M layers, then M-1 ... 0
//                 (Takase & Kiyono 2021: 0 1 2 0 1 2 2 1 0 for 9 layers, M = 3)
enum class SharingPlan { None, All, Sequence, Cycle, CycleReverse };

// "none", "all", "sequence", "cycle", "cycle_reverse"; anything else throws.
SharingPlan parse_sharing_plan(const std::string& name);
std::string sharing_plan_name(SharingPlan plan);
// The number of unique modules when n_unique is not given (0): n_layers for
// None, 1 for All, max(1, n_layers / 2) otherwise.
int64_t default_n_unique(SharingPlan plan, int64_t n_layers);
// Layer -> unique-module index (size n_layers). n_unique 0 means the default;
// throws unless 1 <= n_unique <= n_layers (n_layers for None, 1 for All).
std::vector<int64_t> sharing_plan_indices(SharingPlan plan, int64_t n_layers, int64_t n_unique = 0);

// ---- SharedAttentionTransformer ----

// Builds the FFN of a unique-FFN slot (called with the index of the first layer
// that uses it); the module maps [B, T, d_model] -> [B, T, d_model].
using FfnFactory = std::function<torch::nn::AnyModule(int64_t layer_index)>;

struct SharedAttentionTransformerOptions {
  SharedAttentionTransformerOptions(int64_t vocab_size, int64_t d_model, int64_t n_layers,
                                    int64_t n_heads, int64_t d_ff, int64_t max_seq_len)
      : vocab_size_(vocab_size), d_model_(d_model), n_layers_(n_layers), n_heads_(n_heads),
        d_ff_(d_ff), max_seq_len_(max_seq_len) {}
  TORCH_ARG(int64_t, vocab_size);
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, n_layers);
  TORCH_ARG(int64_t, n_heads);
  TORCH_ARG(int64_t, d_ff);
  TORCH_ARG(int64_t, max_seq_len);
  // Attention sharing plan (see SharingPlan) and its number of unique modules (0: default).
  TORCH_ARG(std::string, sharing) = "none";
  TORCH_ARG(int64_t, n_unique) = 0;
  // Share the FFNs by the same plan (LayerNorms are never shared).
  TORCH_ARG(bool, share_ffn) = false;
  // Factorised embedding: vocab -> embed_dim -> d_model; 0 means d_model (no factorisation).
  TORCH_ARG(int64_t, embed_dim) = 0;
  TORCH_ARG(int64_t, n_kv_heads) = 0;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, causal) = true;
  // Default FFN activation: "gelu", "relu" or "silu".
  TORCH_ARG(std::string, activation) = "gelu";
  // Replaces the default dense FFN (Linear, activation, Linear) when set.
  TORCH_ARG(FfnFactory, ffn_factory) = nullptr;
  TORCH_ARG(bool, tie_embeddings) = true;
};

// The default FFN: Linear(d_model, d_ff), activation, Linear(d_ff, d_model).
class DenseFFNImpl : public torch::nn::Module {
 public:
  DenseFFNImpl(int64_t d_model, int64_t d_ff, std::string activation);
  at::Tensor forward(const at::Tensor& x);

  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  std::string activation;
};
TORCH_MODULE(DenseFFN);

// One pre-norm block: x + drop(attn(ln1(x))), then + drop(ffn(ln2(x))).
// ln1 and ln2 are the block's own; attn and ffn are handles to the model's
// unique modules (registered once, in SharedAttentionTransformerImpl::attentions
// and ::ffns, so that parameters() lists each shared tensor once).
class SharedAttentionBlockImpl : public torch::nn::Module {
 public:
  SharedAttentionBlockImpl(int64_t d_model, SharedAttention attn, torch::nn::AnyModule ffn,
                           double dropout);
  at::Tensor forward(const at::Tensor& x, bool causal,
                     const std::optional<at::Tensor>& key_padding_mask);

  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  SharedAttention attn;
  torch::nn::AnyModule ffn;
  torch::nn::Dropout drop{nullptr};
};
TORCH_MODULE(SharedAttentionBlock);

// Token + position embedding (optionally factorised), the blocks, a final
// LayerNorm and an LM head (tied to the token embedding by default).
// Submodules: tok_emb, pos_emb, emb_proj (factorised only), attentions (the
// unique attention modules), ffns (the unique FFNs), layers (the blocks),
// ln_f, head_proj (factorised only), lm_head (untied only).
class SharedAttentionTransformerImpl : public torch::nn::Module {
 public:
  explicit SharedAttentionTransformerImpl(SharedAttentionTransformerOptions options);

  // tokens [B, T] int64 (T <= max_seq_len) -> logits [B, T, vocab_size].
  // key_padding_mask: bool [B, T], True = padding.
  at::Tensor forward(const at::Tensor& tokens,
                     const std::optional<at::Tensor>& key_padding_mask = std::nullopt);

  int64_t embed_dim() const;
  const SharedAttentionBlockImpl& layer(int64_t i) const;

  SharedAttentionTransformerOptions options;
  std::vector<int64_t> attention_index;  // layer -> index into attentions
  std::vector<int64_t> ffn_index;        // layer -> index into ffns
  torch::nn::Embedding tok_emb{nullptr}, pos_emb{nullptr};
  torch::nn::Linear emb_proj{nullptr}, head_proj{nullptr}, lm_head{nullptr};
  torch::nn::ModuleList attentions{nullptr}, ffns{nullptr}, layers{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Dropout drop{nullptr};
};
TORCH_MODULE(SharedAttentionTransformer);

}  // namespace nn
}  // namespace deepseek_ext
