// Gated sparse FFN through the C++ API: the ops against a masked-dense ATen
// reference (forward and gradients), the grouped-GEMM route of the CUDA
// kernels run on the CPU against the CPU kernels, the LibTorch module, and
// bad inputs.

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "test_util.h"

#include <string>
#include <tuple>
#include <vector>

#include "deepseek_ext/nn/gated_sparse_ffn.h"
#include "deepseek_ext/ops.h"
#include "sparse_ffn/sparse_ffn.h"

namespace {

using deepseek_ext::testing::expect_error;

struct Sample {
  at::Tensor x, w1, b1, w2, gate, idx, order, offsets;
  int64_t block_size;
  std::string activation;
};

Sample make_sample(at::ScalarType dtype, const std::string& activation, int64_t T = 41,
                   int64_t d = 24, int64_t bs = 8, int64_t nb = 6, int64_t k = 2) {
  at::manual_seed(0);
  const int64_t m = activation == "swiglu" ? 2 : 1;
  Sample s;
  s.block_size = bs;
  s.activation = activation;
  s.x = at::randn({T, d}).to(dtype);
  s.w1 = (at::randn({nb * m * bs, d}) / std::sqrt(double(d))).to(dtype);
  s.b1 = (at::randn({nb * m * bs}) * 0.1).to(dtype);
  s.w2 = (at::randn({nb * bs, d}) / std::sqrt(double(nb * bs))).to(dtype);
  s.gate = (at::rand({T, k}) + 0.5).to(dtype);
  std::tie(s.idx, s.order, s.offsets) =
      deepseek_ext::sparse_ffn_route(at::randn({T, nb}), at::zeros({nb}), k);
  return s;
}

at::Tensor act_ref(const at::Tensor& a, const std::string& activation, int64_t bs) {
  if (activation == "gelu") return at::gelu(a);
  if (activation == "gelu_tanh") return at::gelu(a, "tanh");
  if (activation == "silu") return at::silu(a);
  auto v = a.view({a.size(0), -1, 2, bs});
  return (at::silu(v.select(2, 0)) * v.select(2, 1)).reshape({a.size(0), -1});
}

// Every block computed densely, then masked by the gate weights of the selected blocks.
at::Tensor ffn_ref(const Sample& s, const at::Tensor& x, const at::Tensor& w1,
                   const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& gate) {
  const int64_t T = x.size(0), nb = w2.size(0) / s.block_size;
  auto h = act_ref(at::addmm(b1, x, w1.t()), s.activation, s.block_size);
  auto mask = at::zeros({T, nb}, x.options()).scatter(1, s.idx, gate);
  return at::mm((h.view({T, nb, s.block_size}) * mask.unsqueeze(2)).view({T, -1}), w2);
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm()).item<double>();
}

double tolerance(at::ScalarType dtype) {
  return dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-5 : 2e-2;
}

class SparseFFN : public ::testing::TestWithParam<std::tuple<at::ScalarType, std::string>> {};

TEST_P(SparseFFN, ForwardAndGradsMatchMaskedDense) {
  const auto [dtype, activation] = GetParam();
  Sample s = make_sample(dtype, activation);
  std::vector<at::Tensor> leaves = {s.x, s.w1, s.b1, s.w2, s.gate};
  for (auto& t : leaves) t.requires_grad_(true);
  auto [out, hidden] = deepseek_ext::sparse_ffn(s.x, s.w1, s.b1, s.w2, s.gate, s.order, s.offsets,
                                                s.block_size, s.activation);
  // The reference in double from the same (rounded) inputs.
  std::vector<at::Tensor> leaves64;
  for (auto& t : leaves) leaves64.push_back(t.detach().to(at::kDouble).requires_grad_(true));
  auto ref = ffn_ref(s, leaves64[0], leaves64[1], leaves64[2], leaves64[3], leaves64[4]);
  EXPECT_LE(rel_err(out, ref), tolerance(dtype));
  EXPECT_EQ(hidden.size(0), s.gate.numel());

  auto grad = at::randn_like(ref);
  auto got = torch::autograd::grad({out}, leaves, {grad.to(dtype)});
  auto want = torch::autograd::grad({ref}, leaves64, {grad});
  const char* names[] = {"x", "w1", "b1", "w2", "gate"};
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_LE(rel_err(got[i], want[i]), 4 * tolerance(dtype)) << names[i];
  }
}

// The route the CUDA kernels take (at::_grouped_mm over device offsets),
// exercised on the CPU: it must equal the CPU kernels.
TEST_P(SparseFFN, GroupedRouteMatchesCpuKernels) {
  const auto [dtype, activation] = GetParam();
  if (dtype != at::kFloat) GTEST_SKIP() << "PyTorch's CPU _grouped_mm fallback: float32 only here";
  Sample s = make_sample(dtype, activation);
  const auto act = deepseek_ext::ops::parse_activation(activation);
  auto [out, hidden] = deepseek_ext::sparse_ffn(s.x, s.w1, s.b1, s.w2, s.gate, s.order, s.offsets,
                                                s.block_size, s.activation);
  auto [gout, ghidden] = deepseek_ext::ops::sparse_ffn_grouped(s.x, s.w1, s.b1, s.w2, s.gate,
                                                               s.order, s.offsets, s.block_size, act);
  EXPECT_LE(rel_err(gout, out), 1e-5);
  EXPECT_LE(rel_err(ghidden, hidden), 1e-5);
  auto grad_out = at::randn_like(out);
  auto cpu = deepseek_ext::sparse_ffn_backward(grad_out, s.x, s.w1, s.w2, s.gate, hidden, s.order,
                                               s.offsets, s.block_size, s.activation);
  auto grouped = deepseek_ext::ops::sparse_ffn_backward_grouped(
      grad_out, s.x, s.w1, s.w2, s.gate, hidden, s.order, s.offsets, s.block_size, act);
  EXPECT_LE(rel_err(std::get<0>(grouped), std::get<0>(cpu)), 1e-5) << "grad_x";
  EXPECT_LE(rel_err(std::get<1>(grouped), std::get<1>(cpu)), 1e-5) << "grad_w1";
  EXPECT_LE(rel_err(std::get<2>(grouped), std::get<2>(cpu)), 1e-5) << "grad_b1";
  EXPECT_LE(rel_err(std::get<3>(grouped), std::get<3>(cpu)), 1e-5) << "grad_w2";
  EXPECT_LE(rel_err(std::get<4>(grouped), std::get<4>(cpu)), 1e-5) << "grad_gate";
}

// The row movers: gather = x[order / k]; combine = the gated per-token sum.
TEST_P(SparseFFN, GatherAndCombineMatchReference) {
  const auto [dtype, activation] = GetParam();
  if (activation != "gelu") GTEST_SKIP() << "independent of the activation";
  Sample s = make_sample(dtype, activation);
  const int64_t k = s.gate.size(1);
  const at::Tensor xs = deepseek_ext::sparse_ffn_gather(s.x, s.order, k);
  EXPECT_TRUE(at::equal(xs, s.x.index_select(0, at::div(s.order, k, "floor"))));
  const at::Tensor y = at::randn({s.order.numel(), s.x.size(1)}).to(dtype);
  const at::Tensor pos = at::argsort(s.order);
  const at::Tensor rows = y.to(at::kDouble).index_select(0, pos).view({-1, k, y.size(1)});
  const at::Tensor want = (rows * s.gate.to(at::kDouble).unsqueeze(2)).sum(1);
  const at::Tensor got = deepseek_ext::sparse_ffn_combine(y, s.order, k, s.gate);
  EXPECT_EQ(got.scalar_type(), dtype);
  EXPECT_LE(rel_err(got.to(at::kDouble), want), dtype == at::kBFloat16 ? 1e-2 : 1e-6);
  const at::Tensor sum = deepseek_ext::sparse_ffn_combine(y, s.order, k);
  EXPECT_LE(rel_err(sum.to(at::kDouble), rows.sum(1)), dtype == at::kBFloat16 ? 1e-2 : 1e-6);
  expect_error([&] { deepseek_ext::sparse_ffn_combine(y, s.order, k + 1); }, "k must be >= 1 and divide");
}

INSTANTIATE_TEST_SUITE_P(
    DtypesAndActivations, SparseFFN,
    ::testing::Combine(::testing::Values(at::kFloat, at::kDouble, at::kBFloat16),
                       ::testing::Values(std::string("gelu"), std::string("gelu_tanh"),
                                         std::string("silu"), std::string("swiglu"))));

TEST(SparseFFNRoute, GroupsPairsByBlock) {
  at::manual_seed(3);
  auto scores = at::randn({100, 12});
  auto bias = at::randn({12}) * 0.1;
  auto [idx, order, offsets] = deepseek_ext::sparse_ffn_route(scores, bias, 4);
  auto want = std::get<1>(at::topk(scores + bias, 4, 1, true, true));
  EXPECT_TRUE(at::equal(idx, want));
  const auto* off = offsets.data_ptr<int64_t>();
  const auto* ord = order.data_ptr<int64_t>();
  const auto* ip = idx.data_ptr<int64_t>();
  EXPECT_EQ(off[0], 0);
  EXPECT_EQ(off[12], 400);
  for (int64_t b = 0; b < 12; ++b) {
    for (int64_t i = off[b]; i < off[b + 1]; ++i) {
      EXPECT_EQ(ip[ord[i]], b);
      if (i > off[b]) EXPECT_LT(ord[i - 1], ord[i]);  // stable
    }
  }
}

TEST(SparseFFNBadInputs, NameTheArgument) {
  Sample s = make_sample(at::kFloat, "gelu");
  auto call = [&](const at::Tensor& w1, const at::Tensor& w2, int64_t bs, const std::string& act) {
    deepseek_ext::sparse_ffn(s.x, w1, s.b1, w2, s.gate, s.order, s.offsets, bs, act);
  };
  expect_error([&] { call(s.w1.to(at::kDouble), s.w2, 8, "gelu"); }, "w1 must have x's dtype");
  expect_error([&] { call(s.w1, s.w2.narrow(0, 0, 45), 8, "gelu"); }, "w2 must be");
  expect_error([&] { call(s.w1, s.w2, 8, "relu"); }, "activation must be");
  expect_error([&] { call(s.w1, s.w2, 0, "gelu"); }, "block_size must be positive");
  expect_error([&] { deepseek_ext::sparse_ffn_route(at::randn({4, 3}), at::zeros({3}), 0); },
               "k must be in");
  expect_error([&] { deepseek_ext::sparse_ffn_route(at::randn({4, 3}), at::zeros({2}), 1); },
               "bias must be a 1-D tensor");
}

TEST(GatedSparseFFNModule, ForwardBackwardAndBalancing) {
  torch::manual_seed(0);
  deepseek_ext::nn::GatedSparseFFN ffn(
      deepseek_ext::nn::GatedSparseFFNOptions(16, 128).block_size(16).density(0.25).balance_rate(0.1));
  EXPECT_EQ(ffn->n_blocks(), 8);
  EXPECT_EQ(ffn->k(), 2);
  auto x = torch::randn({3, 50, 16}, torch::requires_grad());
  auto y = ffn->forward(x);
  EXPECT_EQ(y.sizes(), x.sizes());
  y.sum().backward();
  EXPECT_GT(ffn->w1.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(ffn->gate_weight.grad().abs().sum().item<double>(), 0);
  EXPECT_EQ(ffn->aux_loss().item<double>(), 0.0);
  // A skewed gate (block 0 wins for every token): the balancing bias pulls
  // the load toward uniform.
  {
    torch::NoGradGuard no_grad;
    ffn->gate_weight.mul_(0.5);
    ffn->gate_weight[0].add_(0.5);
  }
  auto xs = torch::randn({512, 16}).abs();
  ffn->forward(xs);
  ffn->update_balance();
  const double first = (ffn->block_load() - 1.0 / 8).abs().sum().item<double>();
  for (int i = 0; i < 100; ++i) {
    ffn->forward(xs);
    ffn->update_balance();
  }
  const double last = (ffn->block_load() - 1.0 / 8).abs().sum().item<double>();
  EXPECT_LT(last, 0.5 * first);
}

// Forward only counts; the bias moves in update_balance() alone, so a
// recomputed forward (activation checkpointing) routes as the first one did.
TEST(GatedSparseFFNModule, ForwardCountsLoadAndLeavesBiasAlone) {
  torch::manual_seed(0);
  deepseek_ext::nn::GatedSparseFFN ffn(
      deepseek_ext::nn::GatedSparseFFNOptions(16, 128).block_size(16).density(0.25).balance_rate(0.1));
  const auto bias0 = ffn->balance_bias.clone();
  EXPECT_EQ(ffn->load_counts().scalar_type(), torch::kLong);
  EXPECT_EQ(ffn->load_counts().sum().item<int64_t>(), 0);
  auto x1 = torch::randn({37, 16});
  auto x2 = torch::randn({2, 11, 16});
  auto y1 = ffn->forward(x1);
  const auto counts1 = ffn->load_counts().clone();
  EXPECT_EQ(counts1.sum().item<int64_t>(), 37 * ffn->k());
  auto y2 = ffn->forward(x2);
  EXPECT_TRUE(torch::equal(ffn->balance_bias, bias0));
  EXPECT_EQ(ffn->load_counts().sum().item<int64_t>(), (37 + 22) * ffn->k());
  EXPECT_TRUE(torch::equal(ffn->load_counts() - counts1,
                           (ffn->block_load() * (22 * ffn->k())).round().to(torch::kLong)));
  // The same input routes the same way twice (nothing changed in between).
  EXPECT_TRUE(torch::equal(ffn->forward(x1), y1));
  EXPECT_TRUE(torch::equal(ffn->balance_bias, bias0));

  // Eval mode counts nothing.
  const auto counts_train = ffn->load_counts().clone();
  ffn->eval();
  ffn->forward(x1);
  EXPECT_TRUE(torch::equal(ffn->load_counts(), counts_train));
}

TEST(GatedSparseFFNModule, UpdateBalanceMovesBiasTowardBalance) {
  torch::manual_seed(0);
  const double rate = 0.1;
  deepseek_ext::nn::GatedSparseFFN ffn(
      deepseek_ext::nn::GatedSparseFFNOptions(16, 128).block_size(16).density(0.25).balance_rate(rate));
  // Without counts the update changes nothing.
  ffn->update_balance();
  EXPECT_TRUE(torch::equal(ffn->balance_bias, torch::zeros({8})));
  {
    torch::NoGradGuard no_grad;
    ffn->gate_weight.mul_(0.5);
    ffn->gate_weight[0].add_(0.5);
  }
  ffn->forward(torch::randn({256, 16}).abs());
  const auto c = ffn->load_counts().to(torch::kDouble);
  ffn->update_balance();
  // Overloaded blocks go down by rate, underloaded ones up by rate.
  const auto expected = (torch::sign(c.mean() - c) * rate).to(torch::kFloat);
  EXPECT_TRUE(torch::allclose(ffn->balance_bias, expected));
  EXPECT_LT(ffn->balance_bias[0].item<float>(), 0.0f);  // block 0 wins every token
  EXPECT_EQ(ffn->load_counts().sum().item<int64_t>(), 0);
  // The counts are zeroed: a second update changes nothing.
  const auto bias1 = ffn->balance_bias.clone();
  ffn->update_balance();
  EXPECT_TRUE(torch::equal(ffn->balance_bias, bias1));
}

// n_blocks / block_size, bias(false), gelu_tanh, and the zero gate that makes
// the module at density 1 the dense FFN (what a converter relies on).
TEST(GatedSparseFFNModule, NBlocksNoBiasAndZeroGateIsDense) {
  using deepseek_ext::nn::GatedSparseFFNOptions;
  torch::manual_seed(0);
  deepseek_ext::nn::GatedSparseFFN ffn(GatedSparseFFNOptions(16, 64)
                                           .n_blocks(4)
                                           .density(1.0)
                                           .activation("gelu_tanh")
                                           .bias(false));
  EXPECT_EQ(ffn->block_size(), 16);
  EXPECT_EQ(ffn->k(), 4);
  EXPECT_FALSE(ffn->b1.defined());
  EXPECT_FALSE(ffn->b2.defined());
  EXPECT_EQ(ffn->named_parameters().size(), 3u);  // w1, w2, gate_weight
  ffn->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    ffn->gate_weight.zero_();
  }
  auto x = torch::randn({9, 16}, torch::kDouble);
  auto dense = at::mm(at::gelu(at::mm(x, ffn->w1.t()), "tanh"), ffn->w2);
  EXPECT_TRUE(torch::allclose(ffn->forward(x), dense, 1e-12, 1e-12));
  EXPECT_EQ(deepseek_ext::nn::GatedSparseFFN(GatedSparseFFNOptions(16, 256))->n_blocks(), 16);
  // k = round(density * n_blocks), half up as in the Python module.
  EXPECT_EQ(deepseek_ext::nn::GatedSparseFFN(GatedSparseFFNOptions(8, 40).n_blocks(10).density(0.25))->k(), 3);
}

TEST(GatedSparseFFNModule, BadOptions) {
  using deepseek_ext::nn::GatedSparseFFNOptions;
  expect_error([] { deepseek_ext::nn::GatedSparseFFN(GatedSparseFFNOptions(16, 64).n_blocks(5)); },
               "n_blocks must divide d_ff");
  expect_error([] { deepseek_ext::nn::GatedSparseFFN(GatedSparseFFNOptions(16, 64).n_blocks(4).block_size(8)); },
               "n_blocks and block_size disagree");
  expect_error([] { deepseek_ext::nn::GatedSparseFFN(GatedSparseFFNOptions(16, 100).block_size(16)); },
               "block_size must divide d_ff");
  expect_error([] { deepseek_ext::nn::GatedSparseFFN(GatedSparseFFNOptions(16, 64).block_size(16).density(0)); },
               "density must be in (0, 1]");
  expect_error([] { deepseek_ext::nn::GatedSparseFFN(GatedSparseFFNOptions(16, 64).block_size(16).activation("relu")); },
               "activation must be");
}

}  // namespace
