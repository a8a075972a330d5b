// matmul_unscale_check, update_scale_ and amp::DynamicLossScaler from C++.

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <limits>
#include <random>

#include "deepseek_ext/amp/dynamic_loss_scaler.h"
#include "deepseek_ext/ops.h"

namespace {

class MatmulUnscaleCheck : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(MatmulUnscaleCheck, MatchesFloat64AndFlagsOverflow) {
  const at::ScalarType dtype = GetParam();
  at::manual_seed(0);
  const auto a = at::randn({97, 45}).to(dtype);
  const auto b = at::randn({45, 61}).to(dtype);
  auto found = at::zeros({1});
  const auto out = deepseek_ext::matmul_unscale_check(a.t().contiguous().t(), b, at::full({1}, 0.25), found,
                                                      at::kFloat);
  const auto ref = at::matmul(a.to(at::kDouble), b.to(at::kDouble)) * 0.25;
  EXPECT_LT(((out.to(at::kDouble) - ref).norm() / ref.norm()).item<double>(), 1e-6);
  EXPECT_EQ(found.item<float>(), 0.0f);

  auto bad = a.clone();
  bad.index_put_({96, 44}, std::numeric_limits<float>::quiet_NaN());
  deepseek_ext::matmul_unscale_check(bad, b, at::ones({1}), found);
  EXPECT_EQ(found.item<float>(), 1.0f);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MatmulUnscaleCheck, ::testing::Values(at::kFloat, at::kHalf, at::kBFloat16),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

// An independent statement of the rule, to check the op against.
struct Reference {
  double scale;
  int growth = 0, hyst, consecutive = 0, total = 0;
  void step(bool overflow, double gf, double bf, int interval, int hysteresis, double lo, double hi) {
    auto set = [&](double x) { scale = std::exp2(std::floor(std::log2(std::min(std::max(x, lo), hi)))); };
    if (overflow) {
      ++consecutive;
      ++total;
      growth = 0;
      hyst = std::max(hyst - 1, 0);
      if (hyst == 0) set(scale * bf);
    } else {
      consecutive = 0;
      if (++growth >= interval) {
        growth = 0;
        hyst = hysteresis;
        set(scale * gf);
      }
    }
  }
};

class UpdateScale : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(UpdateScale, FollowsTheRuleOverRandomOverflowSequences) {
  const auto [interval, hysteresis] = GetParam();
  std::mt19937 rng(interval * 31 + hysteresis);
  std::bernoulli_distribution overflow(0.3);
  auto scale = at::full({1}, 256.0f);
  auto gt = at::zeros({1}, at::kInt);
  auto ht = at::full({1}, hysteresis, at::kInt);
  auto skips = at::zeros({2}, at::kLong);
  Reference ref{256.0, 0, hysteresis};
  for (int i = 0; i < 400; ++i) {
    const bool o = overflow(rng);
    deepseek_ext::update_scale_(scale, gt, ht, skips, at::full({1}, o ? 1.0f : 0.0f), 2.0, 0.5, interval,
                                hysteresis, 1.0, 65536.0);
    ref.step(o, 2.0, 0.5, interval, hysteresis, 1.0, 65536.0);
    ASSERT_EQ(scale.item<float>(), ref.scale) << "step " << i;
    ASSERT_EQ(gt.item<int>(), ref.growth);
    ASSERT_EQ(ht.item<int>(), ref.hyst);
    ASSERT_EQ(skips[0].item<int64_t>(), ref.consecutive);
    ASSERT_EQ(skips[1].item<int64_t>(), ref.total);
  }
}

INSTANTIATE_TEST_SUITE_P(IntervalsAndHysteresis, UpdateScale,
                         ::testing::Combine(::testing::Values(1, 3, 10), ::testing::Values(1, 2, 4)));

TEST(DynamicLossScaler, SkipsTheStepOnNanAndBacksOff) {
  torch::manual_seed(0);
  torch::nn::Linear model(4, 2);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  deepseek_ext::amp::DynamicLossScaler scaler(deepseek_ext::amp::DynamicLossScalerOptions().init_scale(1024));
  const auto x = at::randn({8, 4});

  auto loss = model->forward(x).pow(2).mean();
  scaler.scale(loss).backward();
  const auto expected_grad = model->weight.grad() / 1024.0;
  EXPECT_TRUE(scaler.step(opt));
  EXPECT_TRUE(at::allclose(model->weight.grad(), expected_grad));  // unscaled in place
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 1024.0);

  opt.zero_grad();
  loss = model->forward(x).pow(2).mean();
  scaler.scale(loss).backward();
  model->bias.mutable_grad().index_put_({0}, std::numeric_limits<float>::infinity());
  const auto before = model->weight.detach().clone();
  EXPECT_FALSE(scaler.step(opt));
  EXPECT_TRUE(at::equal(model->weight.detach(), before));
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 512.0);
  EXPECT_EQ(scaler.skip_counts()[1].item<int64_t>(), 1);
}

TEST(DynamicLossScaler, RejectsBadOptions) {
  using Opts = deepseek_ext::amp::DynamicLossScalerOptions;
  EXPECT_THROW(deepseek_ext::amp::DynamicLossScaler(Opts().min_scale(3.0)), c10::Error);
  EXPECT_THROW(deepseek_ext::amp::DynamicLossScaler(Opts().backoff_factor(1.5)), c10::Error);
  EXPECT_THROW(deepseek_ext::amp::DynamicLossScaler(Opts().growth_factor(1.5)), c10::Error);  // not a power of two
}

}  // namespace
