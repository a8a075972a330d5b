// deepseek_ext::nn::SharedAttention and SharedAttentionTransformer (see the header).

#include "deepseek_ext/nn/shared_attention.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/init.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "deepseek_ext/ops.h"

namespace deepseek_ext {
namespace nn {

namespace {

// As torch::nn::Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
void init_like_linear(at::Tensor& weight, at::Tensor& bias) {
  torch::NoGradGuard no_grad;
  const double bound = 1.0 / std::sqrt(static_cast<double>(weight.size(1)));
  weight.uniform_(-bound, bound);
  if (bias.defined()) bias.uniform_(-bound, bound);
}

// ---- Factorised embedding: the two narrow [B, T, E] activations are recomputed
// in backward instead of kept (as deepseek_ext/nn/shared_attention.py does).
// With embed_dim = E < d_model, plain autograd keeps the input of emb_proj
// (tok_emb(tokens) + pos_emb) and the input of the LM head (head_proj's
// output). Both are cheap to recompute: from the token ids (a gather and an
// add) and from head_proj's input, which these functions keep anyway. Forward
// values are those of the plain composition; gradients equal it to rounding.
// Backward computes in the dtype the forward's linears ran in (the output's)
// and returns each gradient in its input's dtype.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// linear(tok_w[tokens] + pos_w[:T], proj_w, proj_b), keeping the token ids, not the sum.
struct FactorisedEmbedding : torch::autograd::Function<FactorisedEmbedding> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& tokens, const at::Tensor& tok_w,
                            const at::Tensor& pos_w, const at::Tensor& proj_w,
                            const at::Tensor& proj_b) {
    const at::Tensor pos = at::arange(tokens.size(1), tokens.options());
    ctx->save_for_backward({tokens, pos, tok_w, pos_w, proj_w});
    return at::linear(at::embedding(tok_w, tokens) + at::embedding(pos_w, pos), proj_w, proj_b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &tokens = saved[0], &pos = saved[1], &tok_w = saved[2], &pos_w = saved[3],
                     &proj_w = saved[4];
    const at::Tensor& grad = grads[0];
    const at::Tensor g2 = grad.reshape({-1, grad.size(-1)});
    at::Tensor g_tok, g_pos, g_w, g_b;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      const at::Tensor g_e = grad.matmul(proj_w.to(grad.scalar_type())).to(tok_w.scalar_type());
      if (ctx->needs_input_grad(1)) {
        g_tok = at::embedding_dense_backward(g_e, tokens, tok_w.size(0), -1, false);
      }
      if (ctx->needs_input_grad(2)) {
        g_pos = at::embedding_dense_backward(g_e.sum(0).to(pos_w.scalar_type()), pos, pos_w.size(0),
                                             -1, false);
      }
    }
    if (ctx->needs_input_grad(3)) {  // the sum, recomputed (not kept past this block)
      const at::Tensor e =
          (at::embedding(tok_w, tokens) + at::embedding(pos_w, pos)).to(grad.scalar_type());
      g_w = g2.t().matmul(e.reshape({-1, e.size(-1)})).to(proj_w.scalar_type());
    }
    if (ctx->needs_input_grad(4)) g_b = g2.sum(0).to(proj_w.scalar_type());
    return {at::Tensor(), g_tok, g_pos, g_w, g_b};
  }
};

// linear(linear(x, proj_w), out_w): the head of a factorised model, keeping x, not
// the narrow [..., E] middle.
struct FactorisedHead : torch::autograd::Function<FactorisedHead> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& proj_w,
                            const at::Tensor& out_w) {
    ctx->save_for_backward({x, proj_w, out_w});
    return at::linear(at::linear(x, proj_w), out_w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &proj_w = saved[1], &out_w = saved[2];
    const at::Tensor& grad = grads[0];
    const at::Tensor g2 = grad.reshape({-1, grad.size(-1)});
    const at::Tensor x_c = x.to(grad.scalar_type()), proj_c = proj_w.to(grad.scalar_type());
    at::Tensor g_x, g_proj, g_out;
    if (ctx->needs_input_grad(2)) {  // the middle, recomputed (not kept past this block)
      const at::Tensor z = at::linear(x_c, proj_c);
      g_out = g2.t().matmul(z.reshape({-1, z.size(-1)})).to(out_w.scalar_type());
    }
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      const at::Tensor g_z = grad.matmul(out_w.to(grad.scalar_type()));
      if (ctx->needs_input_grad(1)) {
        g_proj = g_z.reshape({-1, g_z.size(-1)})
                     .t()
                     .matmul(x_c.reshape({-1, x_c.size(-1)}))
                     .to(proj_w.scalar_type());
      }
      if (ctx->needs_input_grad(0)) g_x = g_z.matmul(proj_c).to(x.scalar_type());
    }
    return {g_x, g_proj, g_out};
  }
};

}  // namespace

// ---- SharedAttention ----

SharedAttentionImpl::SharedAttentionImpl(const SharedAttentionOptions& options_)
    : options(options_) {
  reset();
}

int64_t SharedAttentionImpl::n_kv_heads() const {
  return options.n_kv_heads() == 0 ? options.n_heads() : options.n_kv_heads();
}

void SharedAttentionImpl::reset() {
  const int64_t d = options.d_model(), h = options.n_heads(), hkv = n_kv_heads();
  TORCH_CHECK(d > 0, "d_model must be positive, got ", d);
  TORCH_CHECK(h > 0, "n_heads must be positive, got ", h);
  TORCH_CHECK(d % h == 0, "d_model (", d, ") must be divisible by n_heads (", h, ")");
  TORCH_CHECK(hkv > 0 && h % hkv == 0, "n_kv_heads must be positive and divide n_heads (", h,
              "), got ", options.n_kv_heads());
  TORCH_CHECK(options.dropout() >= 0.0 && options.dropout() < 1.0,
              "dropout must be in [0, 1), got ", options.dropout());
  const int64_t qkv_dim = (h + 2 * hkv) * (d / h);
  qkv_weight = register_parameter("qkv_weight", torch::empty({qkv_dim, d}));
  out_weight = register_parameter("out_weight", torch::empty({d, d}));
  if (options.bias()) {
    qkv_bias = register_parameter("qkv_bias", torch::empty({qkv_dim}));
    out_bias = register_parameter("out_bias", torch::empty({d}));
  } else {
    qkv_bias = out_bias = at::Tensor();
  }
  reset_parameters();
}

void SharedAttentionImpl::reset_parameters() {
  init_like_linear(qkv_weight, qkv_bias);
  init_like_linear(out_weight, out_bias);
}

void SharedAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "deepseek_ext::nn::SharedAttention(d_model=" << options.d_model()
         << ", n_heads=" << options.n_heads() << ", n_kv_heads=" << n_kv_heads()
         << ", dropout=" << options.dropout() << ", bias=" << std::boolalpha << options.bias()
         << ")";
}

at::Tensor SharedAttentionImpl::forward(const at::Tensor& x, bool causal,
                                        const std::optional<at::Tensor>& key_padding_mask) {
  auto opt = [](const at::Tensor& t) {
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  return deepseek_ext::shared_attention(x, qkv_weight, opt(qkv_bias), out_weight, opt(out_bias),
                                        options.n_heads(), n_kv_heads(), causal,
                                        key_padding_mask, options.dropout(), is_training());
}

// ---- Sharing plans ----

SharingPlan parse_sharing_plan(const std::string& name) {
  if (name == "none") return SharingPlan::None;
  if (name == "all") return SharingPlan::All;
  if (name == "sequence") return SharingPlan::Sequence;
  if (name == "cycle") return SharingPlan::Cycle;
  if (name == "cycle_reverse") return SharingPlan::CycleReverse;
  TORCH_CHECK(false, "sharing must be one of none, all, sequence, cycle, cycle_reverse, got '",
              name, "'");
}

std::string sharing_plan_name(SharingPlan plan) {
  switch (plan) {
    case SharingPlan::None: return "none";
    case SharingPlan::All: return "all";
    case SharingPlan::Sequence: return "sequence";
    case SharingPlan::Cycle: return "cycle";
    case SharingPlan::CycleReverse: return "cycle_reverse";
  }
  TORCH_INTERNAL_ASSERT(false, "unknown sharing plan");
}

int64_t default_n_unique(SharingPlan plan, int64_t n_layers) {
  switch (plan) {
    case SharingPlan::None: return n_layers;
    case SharingPlan::All: return 1;
    default: return std::max<int64_t>(1, n_layers / 2);
  }
}

std::vector<int64_t> sharing_plan_indices(SharingPlan plan, int64_t n_layers, int64_t n_unique) {
  TORCH_CHECK(n_layers > 0, "n_layers must be positive, got ", n_layers);
  const int64_t m = n_unique == 0 ? default_n_unique(plan, n_layers) : n_unique;
  TORCH_CHECK(m >= 1 && m <= n_layers, "n_unique must be in [1, n_layers = ", n_layers, "], got ",
              n_unique);
  TORCH_CHECK(plan != SharingPlan::None || m == n_layers,
              "n_unique must equal n_layers (", n_layers, ") for sharing='none', got ", m);
  TORCH_CHECK(plan != SharingPlan::All || m == 1, "n_unique must be 1 for sharing='all', got ", m);
  std::vector<int64_t> index(n_layers);
  for (int64_t i = 0; i < n_layers; ++i) {
    switch (plan) {
      case SharingPlan::None: index[i] = i; break;
      case SharingPlan::All: index[i] = 0; break;
      case SharingPlan::Sequence: index[i] = i * m / n_layers; break;
      case SharingPlan::Cycle: index[i] = i % m; break;
      case SharingPlan::CycleReverse:
        index[i] = i < n_layers - m ? i % m : n_layers - 1 - i;
        break;
    }
  }
  return index;
}

// ---- Blocks ----

DenseFFNImpl::DenseFFNImpl(int64_t d_model, int64_t d_ff, std::string activation_)
    : activation(std::move(activation_)) {
  TORCH_CHECK(activation == "gelu" || activation == "relu" || activation == "silu",
              "activation must be one of gelu, relu, silu, got '", activation, "'");
  TORCH_CHECK(d_ff > 0, "d_ff must be positive, got ", d_ff);
  fc1 = register_module("fc1", torch::nn::Linear(d_model, d_ff));
  fc2 = register_module("fc2", torch::nn::Linear(d_ff, d_model));
}

at::Tensor DenseFFNImpl::forward(const at::Tensor& x) {
  at::Tensor h = fc1(x);
  if (activation == "gelu") {
    h = at::gelu(h);
  } else if (activation == "relu") {
    h = at::relu(h);
  } else {
    h = at::silu(h);
  }
  return fc2(h);
}

SharedAttentionBlockImpl::SharedAttentionBlockImpl(int64_t d_model, SharedAttention attn_,
                                                   torch::nn::AnyModule ffn_, double dropout)
    : attn(std::move(attn_)), ffn(std::move(ffn_)) {
  ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})));
  ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})));
  drop = register_module("drop", torch::nn::Dropout(dropout));
}

at::Tensor SharedAttentionBlockImpl::forward(const at::Tensor& x, bool causal,
                                             const std::optional<at::Tensor>& key_padding_mask) {
  at::Tensor h = x + drop(attn(ln1(x), causal, key_padding_mask));
  return h + drop(ffn.forward<at::Tensor>(ln2(h)));
}

// ---- SharedAttentionTransformer ----

SharedAttentionTransformerImpl::SharedAttentionTransformerImpl(
    SharedAttentionTransformerOptions options_)
    : options(std::move(options_)) {
  const auto& o = options;
  TORCH_CHECK(o.vocab_size() > 0, "vocab_size must be positive, got ", o.vocab_size());
  TORCH_CHECK(o.d_model() > 0, "d_model must be positive, got ", o.d_model());
  TORCH_CHECK(o.max_seq_len() > 0, "max_seq_len must be positive, got ", o.max_seq_len());
  TORCH_CHECK(o.embed_dim() >= 0, "embed_dim must be positive (or 0 for d_model), got ",
              o.embed_dim());
  TORCH_CHECK(o.dropout() >= 0.0 && o.dropout() < 1.0, "dropout must be in [0, 1), got ",
              o.dropout());
  const SharingPlan plan = parse_sharing_plan(o.sharing());
  attention_index = sharing_plan_indices(plan, o.n_layers(), o.n_unique());
  const int64_t n_attn = *std::max_element(attention_index.begin(), attention_index.end()) + 1;
  if (o.share_ffn()) {
    ffn_index = attention_index;
  } else {
    ffn_index.resize(o.n_layers());
    for (int64_t i = 0; i < o.n_layers(); ++i) ffn_index[i] = i;
  }
  const int64_t n_ffn = *std::max_element(ffn_index.begin(), ffn_index.end()) + 1;
  const int64_t e = embed_dim(), d = o.d_model();

  tok_emb = register_module("tok_emb", torch::nn::Embedding(o.vocab_size(), e));
  pos_emb = register_module("pos_emb", torch::nn::Embedding(o.max_seq_len(), e));
  if (e != d) emb_proj = register_module("emb_proj", torch::nn::Linear(e, d));
  drop = register_module("drop", torch::nn::Dropout(o.dropout()));

  // The unique modules, each built once, for the first layer that uses it.
  std::vector<SharedAttention> unique_attn(n_attn, SharedAttention(nullptr));
  std::vector<torch::nn::AnyModule> unique_ffn(n_ffn);
  attentions = register_module("attentions", torch::nn::ModuleList());
  ffns = register_module("ffns", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.n_layers(); ++i) {
    SharedAttention& a = unique_attn[attention_index[i]];
    if (a.is_empty()) {
      a = SharedAttention(SharedAttentionOptions(d, o.n_heads())
                              .n_kv_heads(o.n_kv_heads())
                              .dropout(o.dropout()));
      attentions->push_back(a);
    }
    torch::nn::AnyModule& f = unique_ffn[ffn_index[i]];
    if (f.is_empty()) {
      f = o.ffn_factory() ? o.ffn_factory()(i)
                          : torch::nn::AnyModule(DenseFFN(d, o.d_ff(), o.activation()));
      TORCH_CHECK(!f.is_empty(), "ffn_factory(", i, ") returned an empty module");
      ffns->push_back(f.ptr());
    }
  }
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.n_layers(); ++i) {
    layers->push_back(SharedAttentionBlock(d, unique_attn[attention_index[i]],
                                           unique_ffn[ffn_index[i]], o.dropout()));
  }
  ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  if (e != d) head_proj = register_module("head_proj", torch::nn::Linear(
                                                           torch::nn::LinearOptions(d, e).bias(false)));
  if (!o.tie_embeddings()) {
    lm_head = register_module("lm_head", torch::nn::Linear(
                                             torch::nn::LinearOptions(e, o.vocab_size()).bias(false)));
  }
  torch::NoGradGuard no_grad;
  tok_emb->weight.normal_(0.0, 0.02);
  pos_emb->weight.normal_(0.0, 0.02);
}

int64_t SharedAttentionTransformerImpl::embed_dim() const {
  return options.embed_dim() == 0 ? options.d_model() : options.embed_dim();
}

const SharedAttentionBlockImpl& SharedAttentionTransformerImpl::layer(int64_t i) const {
  return *layers->ptr<SharedAttentionBlockImpl>(i);
}

at::Tensor SharedAttentionTransformerImpl::forward(
    const at::Tensor& tokens, const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(tokens.dim() == 2, "tokens must be a 2-D tensor [batch, seq], got ", tokens.dim(),
              " dimensions");
  TORCH_CHECK(tokens.scalar_type() == at::kLong, "tokens must be an int64 tensor, got ",
              tokens.scalar_type());
  const int64_t seq = tokens.size(1);
  TORCH_CHECK(seq <= options.max_seq_len(), "tokens.size(1) (", seq,
              ") must not exceed max_seq_len (", options.max_seq_len(), ")");
  // Factorised (embed_dim < d_model): the narrow activations are recomputed in backward.
  const bool factorised = !emb_proj.is_empty();
  at::Tensor h = factorised ? FactorisedEmbedding::apply(tokens, tok_emb->weight, pos_emb->weight,
                                                         emb_proj->weight, emb_proj->bias)
                            : tok_emb(tokens) + pos_emb(at::arange(seq, tokens.options()));
  h = drop(h);
  for (size_t i = 0; i < layers->size(); ++i) {
    h = layers->ptr<SharedAttentionBlockImpl>(i)->forward(h, options.causal(), key_padding_mask);
  }
  h = ln_f(h);
  const at::Tensor& out_w = lm_head.is_empty() ? tok_emb->weight : lm_head->weight;
  return factorised ? FactorisedHead::apply(h, head_proj->weight, out_w) : at::linear(h, out_w);
}

}  // namespace nn
}  // namespace deepseek_ext
