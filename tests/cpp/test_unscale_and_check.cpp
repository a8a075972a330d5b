// unscale_and_check_ through the C++ API, against ATen's
// _amp_foreach_non_finite_check_and_unscale_ on the CPU.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "test_util.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "deepseek_ext/detail/float_bits.h"
#include "deepseek_ext/ops.h"

namespace {

using Param = std::tuple<at::ScalarType, float>;

class UnscaleAndCheck : public ::testing::TestWithParam<Param> {};

std::vector<at::Tensor> make_grads(at::ScalarType dtype, int64_t seed) {
  at::manual_seed(seed);
  std::vector<at::Tensor> grads;
  for (int64_t n : {1, 7, 31, 1000, 65536 + 17, 300001}) {
    grads.push_back((at::randn({n}) * 50).to(dtype));
  }
  grads.push_back((at::randn({33, 17}) * 50).to(dtype).t());  // transposed view
  return grads;
}

void expect_bitwise_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    // equal_nan: NaN compares equal to NaN; everything else must match exactly.
    EXPECT_TRUE(at::allclose(a[i].to(at::kDouble), b[i].to(at::kDouble), 0.0, 0.0, true))
        << "tensor " << i;
  }
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.clone());
  return out;
}

TEST_P(UnscaleAndCheck, MatchesAtenOnFiniteGradients) {
  const auto [dtype, inv] = GetParam();
  auto grads = make_grads(dtype, 1);
  auto expected = clones(grads);
  auto found = at::zeros({1});
  auto found_ref = at::zeros({1});
  const auto inv_scale = at::full({1}, inv);
  at::_amp_foreach_non_finite_check_and_unscale_(expected, found_ref, inv_scale);
  deepseek_ext::unscale_and_check_(grads, found, inv_scale);
  expect_bitwise_equal(grads, expected);
  EXPECT_EQ(found.item<float>(), 0.0f);
  EXPECT_EQ(found_ref.item<float>(), 0.0f);
}

TEST_P(UnscaleAndCheck, FlagsEveryNonFiniteValue) {
  const auto [dtype, inv] = GetParam();
  const float specials[] = {std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  for (float special : specials) {
    auto grads = make_grads(dtype, 2);
    for (size_t t = 0; t < grads.size(); ++t) {
      for (int64_t pos : {int64_t{0}, grads[t].numel() - 1}) {
        auto g = clones(grads);
        // Every tensor here is dense, so its elements are one storage range.
        g[t].as_strided({g[t].numel()}, {1}).index_put_({pos}, special);
        auto found = at::zeros({1});
        deepseek_ext::unscale_and_check_(g, found, at::full({1}, inv));
        EXPECT_EQ(found.item<float>(), 1.0f) << "tensor " << t << " position " << pos;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, UnscaleAndCheck,
                         ::testing::Combine(::testing::Values(at::kFloat, at::kHalf, at::kBFloat16),
                                            ::testing::Values(1.0f, 0.5f, 1.0f / 65536.0f)),
                         [](const auto& info) {
                           const float inv = std::get<1>(info.param);
                           return std::string(c10::toString(std::get<0>(info.param))) +
                                  (inv == 1.0f ? "_check_only" : inv == 0.5f ? "_half" : "_2pow_m16");
                         });

TEST(UnscaleAndCheckErrors, NamesTheArgument) {
  auto ok = at::ones({4});
  auto found = at::zeros({1});
  auto inv = at::ones({1});
  deepseek_ext::testing::expect_error([&] { deepseek_ext::unscale_and_check_({ok, at::ones({2}, at::kInt)}, found, inv); },
               "grads[1] must be float32, float16 or bfloat16");
  deepseek_ext::testing::expect_error([&] { deepseek_ext::unscale_and_check_({ok}, at::zeros({2}), inv); },
               "found_inf must have exactly one element");
  deepseek_ext::testing::expect_error([&] { deepseek_ext::unscale_and_check_({ok}, found, at::ones({1}, at::kDouble)); },
               "inv_scale must be a float32 tensor");
  // A tensor of another device in the list is named before dispatch.
  deepseek_ext::testing::expect_error(
      [&] { deepseek_ext::unscale_and_check_({ok, at::ones({2}, at::TensorOptions().device(at::kMeta))}, found, inv); },
      "grads[1] must be on the same device as found_inf (cpu), got meta");
  EXPECT_TRUE(at::equal(ok, at::ones({4})));
}

TEST(FloatBits, NonFiniteDetectionIsExactOnEveryExponent) {
  using namespace deepseek_ext::bits;
  // Every 16-bit pattern, compared with std::isfinite of its float value.
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const auto bits16 = static_cast<uint16_t>(b);
    const float h = static_cast<float>(c10::Half(bits16, c10::Half::from_bits()));
    const float bf = static_cast<float>(c10::BFloat16(bits16, c10::BFloat16::from_bits()));
    ASSERT_EQ(is_nonfinite_bits<Fp16Format>(bits16), !std::isfinite(h)) << b;
    ASSERT_EQ(is_nonfinite_bits<Bf16Format>(bits16), !std::isfinite(bf)) << b;
    // A float32 with these bits in its top half.
    const uint32_t f32 = b << 16;
    float f;
    std::memcpy(&f, &f32, sizeof f);
    ASSERT_EQ(is_nonfinite_bits<Fp32Format>(f32), !std::isfinite(f)) << b;
  }
}

}  // namespace
