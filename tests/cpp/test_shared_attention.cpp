// GoogleTests of the shared_attention op and deepseek_ext::nn::SharedAttention /
// SharedAttentionTransformer.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

#include "deepseek_ext/nn/shared_attention.h"
#include "deepseek_ext/ops.h"
#include "test_util.h"

namespace dnn = deepseek_ext::nn;
using deepseek_ext::testing::expect_error;

namespace {

// softmax(QK^T / sqrt(hd) + mask) V with the KV heads repeated, in plain ATen.
at::Tensor reference_attention(const at::Tensor& x, const at::Tensor& w_qkv, const at::Tensor& b_qkv,
                               const at::Tensor& w_out, const at::Tensor& b_out, int64_t h,
                               int64_t hkv, bool causal, const at::Tensor& key_padding_mask) {
  const int64_t b = x.size(0), t = x.size(1), d = x.size(2), hd = d / h;
  auto qkv = at::linear(x, w_qkv, b_qkv).view({b, t, h + 2 * hkv, hd}).transpose(1, 2);
  auto q = qkv.narrow(1, 0, h);
  auto k = qkv.narrow(1, h, hkv).repeat_interleave(h / hkv, 1);
  auto v = qkv.narrow(1, h + hkv, hkv).repeat_interleave(h / hkv, 1);
  auto scores = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(hd));
  auto keep = at::ones({b, 1, t, t}, x.options().dtype(at::kBool));
  if (causal) keep = keep.logical_and(at::ones({t, t}, keep.options()).tril());
  if (key_padding_mask.defined()) {
    keep = keep.logical_and(key_padding_mask.logical_not().view({b, 1, 1, t}));
  }
  auto probs = scores.masked_fill(keep.logical_not(), -INFINITY).softmax(-1).nan_to_num(0.0);
  return at::linear(at::matmul(probs, v).transpose(1, 2).reshape({b, t, d}), w_out, b_out);
}

class SharedAttentionOpTest : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(SharedAttentionOpTest, MatchesReference) {
  torch::manual_seed(0);
  const auto opts = torch::TensorOptions().dtype(GetParam());
  const double tol = GetParam() == at::kDouble ? 1e-10 : 1e-5;
  struct Case {
    int64_t b, t, d, h, hkv;
    bool causal, pad;
  };
  for (const Case& c : {Case{2, 5, 16, 4, 4, false, false}, Case{2, 6, 16, 4, 2, true, false},
                        Case{3, 4, 12, 3, 1, false, true}, Case{2, 7, 16, 2, 2, true, true}}) {
    const int64_t qkv = (c.h + 2 * c.hkv) * (c.d / c.h);
    auto x = torch::randn({c.b, c.t, c.d}, opts);
    auto w = torch::randn({qkv, c.d}, opts) * 0.3, bq = torch::randn({qkv}, opts);
    auto wo = torch::randn({c.d, c.d}, opts) * 0.3, bo = torch::randn({c.d}, opts);
    at::Tensor mask;
    if (c.pad) {
      mask = torch::zeros({c.b, c.t}, torch::kBool);
      mask.index_put_({0, torch::indexing::Slice(c.t - 2)}, true);
    }
    auto out = deepseek_ext::shared_attention(
        x, w, bq, wo, bo, c.h, c.hkv, c.causal,
        mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt);
    auto ref = reference_attention(x, w, bq, wo, bo, c.h, c.hkv, c.causal, mask);
    ASSERT_EQ(out.sizes(), x.sizes());
    EXPECT_TRUE(torch::allclose(out, ref, tol, tol)) << (out - ref).abs().max();
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, SharedAttentionOpTest, ::testing::Values(at::kFloat, at::kDouble));

TEST(SharedAttentionOp, RejectsBadInputs) {
  auto x = torch::randn({2, 5, 16});
  auto w = torch::randn({48, 16}), wo = torch::randn({16, 16});
  expect_error([&] { deepseek_ext::shared_attention(x[0], w, {}, wo, {}, 4, 4); }, "x must be a 3-D tensor");
  expect_error([&] { deepseek_ext::shared_attention(x, w, {}, wo, {}, 4, 3); },
               "n_kv_heads must be positive and divide n_heads");
  expect_error([&] { deepseek_ext::shared_attention(x, w.narrow(0, 0, 40), {}, wo, {}, 4, 4); },
               "w_qkv must have shape");
  expect_error([&] { deepseek_ext::shared_attention(x, w, torch::zeros({47}), wo, {}, 4, 4); },
               "b_qkv must have shape");
  expect_error([&] { deepseek_ext::shared_attention(x, w, {}, wo, {}, 4, 4, false, torch::zeros({2, 5})); },
               "key_padding_mask must be a bool tensor");
}

// ---- SharedAttention module ----

TEST(SharedAttentionModule, ShapesAndMasks) {
  torch::manual_seed(0);
  dnn::SharedAttention attn(dnn::SharedAttentionOptions(32, 4).n_kv_heads(2));
  EXPECT_EQ(attn->qkv_weight.sizes(), (std::vector<int64_t>{64, 32}));
  EXPECT_EQ(attn->parameters().size(), 4u);
  auto x = torch::randn({3, 6, 32});
  auto mask = torch::zeros({3, 6}, torch::kBool);
  mask.index_put_({1, torch::indexing::Slice(4)}, true);
  auto out = attn(x, true, mask);
  EXPECT_EQ(out.sizes(), x.sizes());
  auto ref = reference_attention(x, attn->qkv_weight, attn->qkv_bias, attn->out_weight,
                                 attn->out_bias, 4, 2, true, mask);
  EXPECT_TRUE(torch::allclose(out, ref, 1e-5, 1e-5));
  // Padded keys do not change the other positions' outputs.
  auto x2 = x.clone();
  x2.index_put_({1, torch::indexing::Slice(4)}, 100.0);
  using torch::indexing::Slice;
  EXPECT_TRUE(torch::allclose(attn(x2, false, mask).index({1, Slice(0, 4)}),
                              attn(x, false, mask).index({1, Slice(0, 4)}), 1e-5, 1e-5));
  // Causal: changing the last position leaves the earlier ones alone.
  auto x3 = x.clone();
  x3.index_put_({Slice(), -1}, -7.0);
  EXPECT_TRUE(torch::allclose(attn(x3, true).index({Slice(), Slice(0, -1)}),
                              attn(x, true).index({Slice(), Slice(0, -1)}), 1e-5, 1e-5));
  // No bias: two parameters.
  dnn::SharedAttention no_bias(dnn::SharedAttentionOptions(32, 4).bias(false));
  EXPECT_EQ(no_bias->parameters().size(), 2u);
  EXPECT_EQ(no_bias(x).sizes(), x.sizes());
}

TEST(SharedAttentionModule, RejectsBadOptions) {
  expect_error([] { dnn::SharedAttention(30, 4); }, "d_model (30) must be divisible by n_heads (4)");
  expect_error([] { dnn::SharedAttention(dnn::SharedAttentionOptions(32, 4).n_kv_heads(3)); },
               "n_kv_heads must be positive and divide n_heads");
  expect_error([] { dnn::SharedAttention(dnn::SharedAttentionOptions(32, 4).dropout(1.0)); },
               "dropout must be in [0, 1)");
}

// ---- sharing plans ----

TEST(SharingPlan, Indices) {
  using P = dnn::SharingPlan;
  using V = std::vector<int64_t>;
  EXPECT_EQ(dnn::sharing_plan_indices(P::None, 6), (V{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(dnn::sharing_plan_indices(P::All, 6), (V{0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(dnn::sharing_plan_indices(P::Sequence, 6, 3), (V{0, 0, 1, 1, 2, 2}));
  EXPECT_EQ(dnn::sharing_plan_indices(P::Cycle, 6, 3), (V{0, 1, 2, 0, 1, 2}));
  EXPECT_EQ(dnn::sharing_plan_indices(P::CycleReverse, 6, 3), (V{0, 1, 2, 2, 1, 0}));
  EXPECT_EQ(dnn::sharing_plan_indices(P::CycleReverse, 9, 3), (V{0, 1, 2, 0, 1, 2, 2, 1, 0}));
  EXPECT_EQ(dnn::sharing_plan_indices(P::Cycle, 4), (V{0, 1, 0, 1}));  // default n_unique = 2
  expect_error([] { dnn::sharing_plan_indices(P::Cycle, 4, 5); }, "n_unique must be in [1, n_layers = 4]");
  expect_error([] { dnn::sharing_plan_indices(P::All, 4, 2); }, "n_unique must be 1 for sharing='all'");
  expect_error([] { dnn::parse_sharing_plan("every_other"); }, "sharing must be one of");
  for (const char* name : {"none", "all", "sequence", "cycle", "cycle_reverse"}) {
    EXPECT_EQ(dnn::sharing_plan_name(dnn::parse_sharing_plan(name)), name);
  }
}

// ---- SharedAttentionTransformer ----

dnn::SharedAttentionTransformerOptions small() {
  return dnn::SharedAttentionTransformerOptions(50, 32, 4, 4, 64, 16);
}

TEST(SharedAttentionTransformer, PlanMapsLayersToUniqueModules) {
  struct Case {
    std::string plan;
    int64_t n_unique;
    bool share_ffn;
  };
  for (const Case& c : {Case{"none", 0, false}, Case{"all", 0, true}, Case{"sequence", 2, false},
                        Case{"cycle", 2, true}, Case{"cycle_reverse", 3, false}}) {
    dnn::SharedAttentionTransformer model(small().sharing(c.plan).n_unique(c.n_unique).share_ffn(c.share_ffn));
    const auto idx = dnn::sharing_plan_indices(dnn::parse_sharing_plan(c.plan), 4, c.n_unique);
    EXPECT_EQ(model->attention_index, idx) << c.plan;
    int64_t n_unique = *std::max_element(idx.begin(), idx.end()) + 1;
    EXPECT_EQ(static_cast<int64_t>(model->attentions->size()), n_unique) << c.plan;
    for (int64_t i = 0; i < 4; ++i) {
      for (int64_t j = 0; j < 4; ++j) {
        EXPECT_EQ(model->layer(i).attn.get() == model->layer(j).attn.get(), idx[i] == idx[j]);
        EXPECT_EQ(model->layer(i).ffn.ptr() == model->layer(j).ffn.ptr(),
                  i == j || (c.share_ffn && idx[i] == idx[j]));
        EXPECT_EQ(model->layer(i).ln1.get() == model->layer(j).ln1.get(), i == j);
      }
    }
    // parameters() lists each shared tensor once.
    std::vector<at::Tensor> params = model->parameters();
    for (size_t a = 0; a < params.size(); ++a) {
      for (size_t b = a + 1; b < params.size(); ++b) {
        EXPECT_FALSE(params[a].is_same(params[b])) << c.plan;
      }
    }
    auto tokens = torch::randint(50, {2, 7}, torch::kLong);
    EXPECT_EQ(model(tokens).sizes(), (std::vector<int64_t>{2, 7, 50}));
  }
}

int64_t count(const std::vector<at::Tensor>& params) {
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  return n;
}

TEST(SharedAttentionTransformer, ParameterCounts) {
  // d = 32, H = 4, f = 64, V = 50, L = 16, N = 4 (see parameter_formula in Python).
  const int64_t attn = 96 * 32 + 96 + 32 * 32 + 32, ffn = 2 * 32 * 64 + 64 + 32;
  const int64_t norms = 4 * 32 * 4 + 2 * 32, emb = (50 + 16) * 32;
  EXPECT_EQ(count(dnn::SharedAttentionTransformer(small())->parameters()), emb + 4 * attn + 4 * ffn + norms);
  EXPECT_EQ(count(dnn::SharedAttentionTransformer(small().sharing("all"))->parameters()),
            emb + attn + 4 * ffn + norms);
  EXPECT_EQ(count(dnn::SharedAttentionTransformer(small().sharing("cycle").n_unique(2).share_ffn(true))
                      ->parameters()),
            emb + 2 * attn + 2 * ffn + norms);
  // Factorised (E = 8) and untied: (V + L) E + E d + d + d E + V E.
  EXPECT_EQ(count(dnn::SharedAttentionTransformer(small().sharing("all").embed_dim(8).tie_embeddings(false))
                      ->parameters()),
            (50 + 16) * 8 + 8 * 32 + 32 + attn + 4 * ffn + norms + 32 * 8 + 50 * 8);
}

TEST(SharedAttentionTransformer, SharedGradientIsSumOfUntiedClones) {
  torch::manual_seed(0);
  dnn::SharedAttentionTransformer shared(small().sharing("all"));
  dnn::SharedAttentionTransformer untied(small());
  {
    torch::NoGradGuard no_grad;
    auto src = shared->named_parameters();
    for (auto& item : untied->named_parameters()) {
      std::string name = item.key();
      if (name.rfind("attentions.", 0) == 0) {
        name = "attentions.0." + name.substr(name.find('.', 11) + 1);
      }
      item.value().copy_(src[name]);
    }
  }
  auto tokens = torch::randint(50, {2, 9}, torch::kLong);
  auto mask = torch::zeros({2, 9}, torch::kBool);
  mask.index_put_({1, torch::indexing::Slice(6)}, true);
  shared(tokens, mask).sum().backward();
  untied(tokens, mask).sum().backward();
  auto& a = *shared->attentions->ptr<dnn::SharedAttentionImpl>(0);
  std::vector<at::Tensor> sums(4);
  for (size_t i = 0; i < untied->attentions->size(); ++i) {
    auto& u = *untied->attentions->ptr<dnn::SharedAttentionImpl>(i);
    const at::Tensor grads[4] = {u.qkv_weight.grad(), u.qkv_bias.grad(), u.out_weight.grad(),
                                 u.out_bias.grad()};
    for (int k = 0; k < 4; ++k) sums[k] = sums[k].defined() ? sums[k] + grads[k] : grads[k];
  }
  const at::Tensor shared_grads[4] = {a.qkv_weight.grad(), a.qkv_bias.grad(), a.out_weight.grad(),
                                      a.out_bias.grad()};
  for (int k = 0; k < 4; ++k) {
    EXPECT_TRUE(torch::allclose(shared_grads[k], sums[k], 1e-5, 1e-5))
        << k << ": " << (shared_grads[k] - sums[k]).abs().max();
  }
}

// A factorised embedding (embed_dim < d_model) runs two autograd functions that
// recompute the narrow [B, T, E] activations in backward instead of keeping them:
// the same output and gradients as the plain composition of the same modules.
TEST(SharedAttentionTransformer, FactorisedRecomputeMatchesPlainComposition) {
  for (const bool tie : {true, false}) {
    torch::manual_seed(0);
    dnn::SharedAttentionTransformer model(
        small().sharing("cycle").n_unique(2).embed_dim(8).tie_embeddings(tie));
    const auto tokens = torch::randint(50, {3, 7}, torch::kLong);
    const auto out = model(tokens);
    out.logsumexp(-1).mean().backward();
    std::vector<at::Tensor> recomputed;
    for (const auto& p : model->parameters()) recomputed.push_back(p.grad().clone());
    model->zero_grad();

    at::Tensor h = model->emb_proj(model->tok_emb(tokens) + model->pos_emb(torch::arange(7, torch::kLong)));
    for (size_t i = 0; i < model->layers->size(); ++i) {
      h = model->layers->ptr<dnn::SharedAttentionBlockImpl>(i)->forward(h, model->options.causal(), std::nullopt);
    }
    h = model->head_proj(model->ln_f(h));
    const at::Tensor plain = tie ? at::linear(h, model->tok_emb->weight) : model->lm_head(h);
    EXPECT_TRUE(torch::equal(out, plain)) << "tie " << tie;
    plain.logsumexp(-1).mean().backward();
    const auto params = model->parameters();
    ASSERT_EQ(params.size(), recomputed.size());
    for (size_t k = 0; k < params.size(); ++k) {
      EXPECT_TRUE(torch::allclose(recomputed[k], params[k].grad(), 1e-5, 1e-6))
          << "tie " << tie << ", parameter " << k << ": " << (recomputed[k] - params[k].grad()).abs().max();
    }
  }
}

TEST(SharedAttentionTransformer, FfnFactory) {
  std::vector<int64_t> calls;
  auto model = dnn::SharedAttentionTransformer(
      small().sharing("cycle").n_unique(2).share_ffn(true).ffn_factory([&](int64_t i) {
        calls.push_back(i);
        return torch::nn::AnyModule(torch::nn::Linear(32, 32));
      }));
  EXPECT_EQ(calls, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(model->ffns->size(), 2u);
  EXPECT_EQ(model(torch::randint(50, {1, 4}, torch::kLong)).sizes(), (std::vector<int64_t>{1, 4, 50}));
}

TEST(SharedAttentionTransformer, RejectsBadOptionsAndInputs) {
  expect_error([] { dnn::SharedAttentionTransformer(small().sharing("every_other")); }, "sharing must be one of");
  expect_error([] { dnn::SharedAttentionTransformer(small().activation("tanh")); }, "activation must be one of");
  expect_error([] { dnn::SharedAttentionTransformer(small().sharing("none").n_unique(2)); },
               "n_unique must equal n_layers");
  dnn::SharedAttentionTransformer model(small());
  expect_error([&] { model(torch::zeros({1, 17}, torch::kLong)); }, "must not exceed max_seq_len (16)");
  expect_error([&] { model(torch::zeros({1, 4})); }, "tokens must be an int64 tensor");
}

}  // namespace
