// int8 gradient quantisation through the C++ API, against ATen-op references
// (round to nearest) and the scalar definitions of detail/int8_quant.h
// (stochastic rounding, error feedback, reduction) on the CPU.

#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <gtest/gtest.h>

#include "test_util.h"

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "deepseek_ext/detail/int8_quant.h"
#include "deepseek_ext/detail/philox.h"
#include "deepseek_ext/ops.h"

namespace {

namespace int8q = deepseek_ext::int8q;
namespace philox = deepseek_ext::philox;

const std::vector<int64_t> kSizes = {1, 31, 1000, 4096 + 7, 70001};
const std::vector<int64_t> kBlocks = {32, 96, 256, 4096};

at::Tensor make_input(int64_t n, at::ScalarType dtype, int64_t seed) {
  at::manual_seed(seed);
  // Blocks of very different magnitudes, as real gradients have.
  const int64_t groups = (n + 31) / 32;
  auto mags = at::pow(10.0, at::randint(-6, 3, {groups}).to(at::kFloat));
  auto x = at::randn({n}) * mags.repeat_interleave(32).narrow(0, 0, n);
  return x.to(dtype);
}

void expect_bitwise(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  ASSERT_EQ(a.scalar_type(), b.scalar_type()) << what;
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  // equal_nan: NaN equals NaN; everything else exactly.
  EXPECT_TRUE(at::allclose(a.to(at::kDouble), b.to(at::kDouble), 0.0, 0.0, true)) << what;
}

// Round-to-nearest q and scales with ATen ops (block_size must divide the padded size).
std::tuple<at::Tensor, at::Tensor> aten_quantize_rne(const at::Tensor& x, int64_t bs) {
  const int64_t n = x.numel();
  const int64_t nb = (n + bs - 1) / bs;
  auto y = at::zeros({nb * bs});
  y.narrow(0, 0, n).copy_(x.reshape({-1}).to(at::kFloat));
  auto yb = y.view({nb, bs});
  auto scales = yb.abs().amax({1}) / 127.0;
  auto safe = at::where(scales > 0, scales, at::ones_like(scales)).unsqueeze(1);
  auto r = at::round(yb / safe).clamp(-127, 127);
  r = at::where((scales > 0).unsqueeze(1), r, at::zeros_like(r));
  return {r.reshape({-1}).narrow(0, 0, n).to(at::kChar), scales};
}

class Quantize : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(Quantize, RoundToNearestMatchesAten) {
  const auto dtype = GetParam();
  for (int64_t bs : kBlocks) {
    for (int64_t n : kSizes) {
      const auto x = make_input(n, dtype, n + bs);
      auto [q, s] = deepseek_ext::quantize_int8(x, bs);
      auto [q_ref, s_ref] = aten_quantize_rne(x, bs);
      const std::string what = "n=" + std::to_string(n) + " bs=" + std::to_string(bs);
      expect_bitwise(q, q_ref, "q " + what);
      expect_bitwise(s, s_ref, "scales " + what);
      // Per-element error <= scale / 2 (+ the one rounding of x / scale).
      auto s_elem = s.to(at::kDouble).repeat_interleave(bs).narrow(0, 0, n);
      auto err = (x.to(at::kDouble) - q.to(at::kDouble) * s_elem).abs();
      EXPECT_TRUE((err <= s_elem * (0.5 + 127 * std::ldexp(1.0, -24))).all().item<bool>()) << what;
    }
  }
}

TEST_P(Quantize, StochasticMatchesScalarDefinition) {
  const auto dtype = GetParam();
  const std::vector<std::pair<uint64_t, uint64_t>> keys = {
      {0, 0}, {1, 1}, {(uint64_t{1} << 40) + 3, 2}, {7, 3}, {12345, (uint64_t{1} << 33) - 9}};
  for (int64_t bs : kBlocks) {
    for (int64_t n : kSizes) {
      for (auto [seed, offset] : keys) {
        const auto x = make_input(n, dtype, n);
        auto [q, s] = deepseek_ext::quantize_int8(x, bs, true, static_cast<int64_t>(seed),
                                                  static_cast<int64_t>(offset));
        auto [q_rne, s_ref] = aten_quantize_rne(x, bs);
        expect_bitwise(s, s_ref, "scales");
        const auto xf = x.to(at::kFloat).contiguous();
        const float* xp = xf.const_data_ptr<float>();
        const float* sp = s.const_data_ptr<float>();
        const int8_t* qp = q.const_data_ptr<int8_t>();
        int64_t mismatches = 0;
        for (int64_t i = 0; i < n; ++i) {
          const uint32_t w = philox::philox_word(seed, offset + static_cast<uint64_t>(i));
          const float expected = int8q::quantize_sr(xp[i], sp[i / bs], w);
          mismatches += static_cast<float>(qp[i]) != expected;
        }
        EXPECT_EQ(mismatches, 0) << "n=" << n << " bs=" << bs << " seed=" << seed
                                 << " offset=" << offset;
      }
    }
  }
}

TEST_P(Quantize, ErrorFeedbackMatchesScalarDefinition) {
  const auto dtype = GetParam();
  for (auto res_dtype : {at::kFloat, at::kBFloat16}) {
    for (bool stochastic : {false, true}) {
      for (int64_t bs : {int64_t{32}, int64_t{96}, int64_t{256}}) {
        const int64_t n = 70001;
        const auto x = make_input(n, dtype, 3);
        auto residual = (at::randn({n}) * 0.01).to(res_dtype);
        const auto r0 = residual.to(at::kFloat).clone();  // .to() of a float tensor aliases it
        auto [q, s] = deepseek_ext::quantize_int8_ef_(x, residual, bs, stochastic, 5, 17);
        const auto xf = x.to(at::kFloat);
        const auto r_new = residual.to(at::kFloat);
        const float* xp = xf.const_data_ptr<float>();
        const float* rp0 = r0.const_data_ptr<float>();
        const float* rp = r_new.const_data_ptr<float>();
        const float* sp = s.const_data_ptr<float>();
        const int8_t* qp = q.const_data_ptr<int8_t>();
        // Scales: from y = x + residual, by ATen.
        auto [q_unused, s_ref] = aten_quantize_rne((xf + r0), bs);
        expect_bitwise(s, s_ref, "scales");
        int64_t bad_q = 0, bad_r = 0;
        for (int64_t i = 0; i < n; ++i) {
          const float y = int8q::add_rn(xp[i], rp0[i]);
          const float scale = sp[i / bs];
          const float qf = stochastic
                               ? int8q::quantize_sr(y, scale, philox::philox_word(5, 17 + i))
                               : int8q::quantize_rne(y, scale);
          bad_q += static_cast<float>(qp[i]) != qf;
          float r = int8q::residual(y, qf, scale);
          if (res_dtype == at::kBFloat16) r = static_cast<float>(c10::BFloat16(r));
          bad_r += rp[i] != r;
        }
        EXPECT_EQ(bad_q, 0) << c10::toString(res_dtype) << " stochastic=" << stochastic << " bs=" << bs;
        EXPECT_EQ(bad_r, 0) << c10::toString(res_dtype) << " stochastic=" << stochastic << " bs=" << bs;
      }
    }
  }
}

TEST_P(Quantize, DequantizeMatchesAten) {
  const auto out_dtype = GetParam();
  for (int64_t bs : kBlocks) {
    for (int64_t n : kSizes) {
      auto [q, s] = deepseek_ext::quantize_int8(make_input(n, at::kFloat, n), bs);
      auto d = deepseek_ext::dequantize_int8(q, s, bs, out_dtype, n);
      auto ref = (q.to(at::kFloat) * s.repeat_interleave(bs).narrow(0, 0, n)).to(out_dtype);
      expect_bitwise(d, ref, "n=" + std::to_string(n) + " bs=" + std::to_string(bs));
    }
  }
}

TEST_P(Quantize, DequantizeReduceMatchesScalarDefinitionAndFloat64) {
  const auto out_dtype = GetParam();
  for (int64_t W : {1, 3, 8}) {
    for (int64_t bs : {int64_t{32}, int64_t{256}}) {
      const int64_t n = 10007;
      std::vector<at::Tensor> qs, ss;
      for (int64_t w = 0; w < W; ++w) {
        auto [q, s] = deepseek_ext::quantize_int8(make_input(n, at::kFloat, 100 + w), bs);
        qs.push_back(q);
        ss.push_back(s);
      }
      auto q = at::stack(qs);
      auto s = at::stack(ss);
      const double mult = 1.0 / static_cast<double>(W);
      auto out = deepseek_ext::dequantize_reduce_int8(q, s, bs, mult, out_dtype);
      // Scalar definition: rank-ordered fmas, then * multiplier, then the dtype.
      auto expected = at::empty({n});
      const int8_t* qp = q.const_data_ptr<int8_t>();
      const float* sp = s.const_data_ptr<float>();
      const int64_t nb = s.size(1);
      for (int64_t i = 0; i < n; ++i) {
        float acc = 0.0f;
        for (int64_t w = 0; w < W; ++w) {
          acc = int8q::accumulate(acc, static_cast<float>(qp[w * n + i]), sp[w * nb + i / bs]);
        }
        expected[i] = int8q::mul_rn(static_cast<float>(mult), acc);
      }
      expect_bitwise(out, expected.to(out_dtype), "W=" + std::to_string(W));
      // And close to the float64 sum computed by ATen: W + 1 float32 roundings
      // of partial sums bounded by sum |terms|, then the output dtype's rounding
      // (relative, plus half its subnormal spacing).
      auto terms = q.to(at::kDouble) * s.to(at::kDouble).repeat_interleave(bs, 1).narrow(1, 0, n);
      auto ref = terms.sum(0) * mult;
      const double eps = out_dtype == at::kFloat ? std::ldexp(1.0, -24)
                         : out_dtype == at::kHalf ? std::ldexp(1.0, -11)
                                                  : std::ldexp(1.0, -8);
      const double tiny = out_dtype == at::kHalf ? std::ldexp(1.0, -25) : 1e-40;
      auto tol = (W + 1) * std::ldexp(1.0, -24) * terms.abs().sum(0) * mult + eps * ref.abs() + tiny;
      EXPECT_TRUE(((out.to(at::kDouble) - ref).abs() <= tol).all().item<bool>()) << "W=" << W;
    }
  }
}

TEST_P(Quantize, NonFiniteBlocksDequantiseToNaN) {
  const auto dtype = GetParam();
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN()}) {
    auto x = make_input(1000, dtype, 1);
    x.index_put_({300}, bad);
    auto [q, s] = deepseek_ext::quantize_int8(x, 256, true, 1, 0);
    EXPECT_TRUE(std::isnan(s[1].item<float>()));
    EXPECT_FALSE(std::isnan(s[0].item<float>()));
    EXPECT_TRUE((q.narrow(0, 256, 256) == 0).all().item<bool>());
    auto d = deepseek_ext::dequantize_int8(q, s, 256, dtype, 1000);
    EXPECT_TRUE(d.narrow(0, 256, 256).isnan().all().item<bool>());
    EXPECT_FALSE(d.narrow(0, 0, 256).isnan().any().item<bool>());
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, Quantize,
                         ::testing::Values(at::kFloat, at::kHalf, at::kBFloat16),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

float from_bits(uint32_t b) { return int8q::bits_to_float(b); }
uint32_t bits(float f) { return int8q::float_to_bits(f); }

// The CUDA kernel's division through one reciprocal per thread against IEEE
// division, bit for bit, for scales across the whole range rne_by_reciprocal
// accepts and values of every magnitude up to 127.5 scale: random, exact ties
// (k + 1/2) scale, zeros of both signs and subnormals.
//   * quantize_rne_by against quantize_rne: q and residual;
//   * div_by against div_rn where neither y nor y / s is below 2^-100.
TEST(Int8Math, DivisionByReciprocalEqualsDivision) {
  std::mt19937_64 gen(20261128);
  int64_t checked = 0, quotients = 0;
  auto check = [&](float y, float s) {
    ASSERT_TRUE(int8q::rne_by_reciprocal(s)) << s;
    const auto d = int8q::scale_divisor(s);
    const float want = int8q::quantize_rne(y, s);
    const float got = int8q::quantize_rne_by(y, d);
    ASSERT_EQ(bits(got), bits(want)) << "y=" << y << " s=" << s;
    ASSERT_EQ(bits(int8q::residual(y, got, s)), bits(int8q::residual(y, want, s)));
    if (y == 0.0f || (std::fabs(y) >= std::ldexp(s, -100) && std::fabs(y) >= std::ldexp(1.0f, -100))) {
      ASSERT_EQ(bits(int8q::div_by(y, d)), bits(int8q::div_rn(y, s))) << "y=" << y << " s=" << s;
      ++quotients;
    }
    ++checked;
  };
  for (int rep = 0; rep < 1 << 15; ++rep) {
    // Every 128th significand of s across the accepted exponents, the extremes included.
    const uint32_t mant = static_cast<uint32_t>(rep * 256 + (gen() & 255)) & 0x7fffffu;
    const uint32_t e = int8q::kReciprocalMinExponent +
                       static_cast<uint32_t>(gen() % (int8q::kReciprocalMaxExponent -
                                                      int8q::kReciprocalMinExponent + 1));
    const float s = from_bits((e << 23) | (rep % 7 == 0 ? 0x7fffffu : mant));
    const float ymax = 127.5f * s;
    for (int k = 0; k < 64; ++k) {
      const uint64_t r = gen();
      // |y| = ymax * u, u in (0, 1]: uniform, or log-uniform down to 2^-140.
      const double u = (k % 2) ? std::ldexp(static_cast<double>(r >> 11) + 1, -53)
                               : std::exp2(-140.0 * static_cast<double>(r >> 11) / 9007199254740992.0);
      float y = static_cast<float>(ymax * u);
      if (r & 1) y = -y;
      check(y, s);
    }
    // Ties: (k + 1/2) s is exact when s has 9 trailing zero bits in its significand.
    const float st = from_bits((e << 23) | (mant & ~0x1ffu));
    for (int q = -127; q < 127; q += 9) check((static_cast<float>(q) + 0.5f) * st, st);
    check(0.0f, s);
    check(-0.0f, s);
    check(from_bits(1u + static_cast<uint32_t>(gen() % 0x7fffffu)), s);  // a subnormal y
    check(-from_bits(1u), s);
  }
  EXPECT_GT(quotients, checked / 2);
  // Outside the range the kernels keep the division.
  EXPECT_FALSE(int8q::rne_by_reciprocal(std::ldexp(1.0f, -91)));
  EXPECT_FALSE(int8q::rne_by_reciprocal(std::ldexp(1.0f, 91)));
  EXPECT_FALSE(int8q::rne_by_reciprocal(0.0f));
  EXPECT_FALSE(int8q::rne_by_reciprocal(std::numeric_limits<float>::quiet_NaN()));
  EXPECT_TRUE(int8q::rne_by_reciprocal(std::ldexp(1.0f, -90)));
  EXPECT_TRUE(int8q::rne_by_reciprocal(std::nextafter(std::ldexp(1.0f, 91), 0.0f)));
}

// The q codes (t = q + 1.5 * 2^23) against rint / floor written directly: for
// every quarter in [-130, 130] and its two float neighbours (ties and values
// just off them), zeros of both signs, tiny values and random ones, the code's
// low byte is the int8 q and code_value its float value, +0 for zero. The
// stochastic code is checked with words at, just below and just above the
// threshold u = v - floor(v), and random ones.
int64_t ru_differs_from_rn = 0;  // evidence that the rounding mode took effect

// An fma the compiler can neither fold nor move across the rounding-mode change.
__attribute__((noinline, noipa)) float fma_opaque(float a, float b, float c) { return std::fma(a, b, c); }

// RU(frac * 2^23 + 2^23) as the device computes it (__fmaf_ru), here with the
// FPU rounding upward for the one fma.
float device_ceil_sum(float frac) {
  const int mode = std::fegetround();
  std::fesetround(FE_UPWARD);
  const float sum = fma_opaque(frac, int8q::kTwoPow23, int8q::kTwoPow23);
  std::fesetround(mode);
  ru_differs_from_rn += sum != fma_opaque(frac, int8q::kTwoPow23, int8q::kTwoPow23);
  return sum;
}

TEST(Int8Math, CodesRoundLikeRintAndFloorAndHoldTheInt8) {
  auto clamp_ref = [](float r) { return r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r); };
  std::vector<float> vs = {0.0f, -0.0f, 1e-30f, -1e-30f, from_bits(1u), -from_bits(1u),
                           127.49998f, -127.49998f, 127.5f, -127.5f, 1000.0f, -1000.0f};
  for (int k = -130 * 4; k <= 130 * 4; ++k) {
    const float v = static_cast<float>(k) * 0.25f;
    vs.push_back(v);
    vs.push_back(std::nextafter(v, 1e9f));
    vs.push_back(std::nextafter(v, -1e9f));
  }
  std::mt19937_64 gen(7);
  std::uniform_real_distribution<float> dist(-140.0f, 140.0f);
  for (int k = 0; k < 100000; ++k) vs.push_back(dist(gen));
  // Quotients below 1 in magnitude: frac has bits below 2^-23 (and for
  // negative ones is rounded), where the device's upward rounding matters.
  std::uniform_real_distribution<float> small(-1.0f, 1.0f);
  for (int k = 0; k < 50000; ++k) vs.push_back(small(gen));
  for (int k = 0; k < 10000; ++k) vs.push_back(std::ldexp(small(gen), -(k % 140)));
  int64_t ups = 0, downs = 0;
  for (const float v : vs) {
    const float want = clamp_ref(std::nearbyint(v)) + 0.0f;  // + 0: -0 becomes +0
    const float t = int8q::rne_code(v);
    ASSERT_EQ(bits(int8q::code_value(t)), bits(want)) << "v=" << v;
    ASSERT_EQ(int8q::code_byte(t), static_cast<int8_t>(want)) << "v=" << v;

    const float vc = clamp_ref(v);
    const float f = std::floor(vc);
    const float frac = vc - f;  // exact but for vc in (-1, 0)
    const uint32_t at = static_cast<uint32_t>(std::ldexp(static_cast<double>(frac), 23));  // floor(frac * 2^23)
    // Words whose top 23 bits k sit at and next to the threshold (low bits set or not).
    const uint32_t words[] = {(at << 9) | 0x1ffu, at == 0 ? 0u : ((at - 1) << 9), (at + 1) << 9,
                              at == 0 ? 0x1ffu : ((at - 1) << 9) | 0x1ffu, static_cast<uint32_t>(gen())};
    for (const uint32_t w : words) {
      const float u = static_cast<float>(w >> 9) * 1.1920928955078125e-07f;  // k * 2^-23
      const float q_ref = (u < frac ? f + 1.0f : f) + 0.0f;
      const float ts = int8q::sr_code(v, w);
      ASSERT_EQ(bits(int8q::code_value(ts)), bits(q_ref)) << "v=" << v << " w=" << w;
      // The device's form of the same decision (int8q::sr_code under __CUDA_ARCH__).
      ASSERT_EQ(int8q::rounds_up_by_bits(w, device_ceil_sum(frac)), u < frac) << "v=" << v << " w=" << w;
      ASSERT_EQ(int8q::code_byte(ts), static_cast<int8_t>(q_ref)) << "v=" << v << " w=" << w;
      (q_ref > f ? ups : downs) += 1;
    }
  }
  EXPECT_GT(ru_differs_from_rn, 20000);
  EXPECT_GT(ups, 100000);  // both outcomes are exercised
  EXPECT_GT(downs, 100000);
  // A zero q carries no sign, so the residual of y = -0 is -0 (y itself).
  EXPECT_EQ(bits(int8q::quantize_rne(-0.25f, 1.0f)), 0u);
  EXPECT_EQ(bits(int8q::residual(-0.0f, int8q::quantize_rne(-0.0f, 1.0f), 1.0f)), bits(-0.0f));
}

TEST(Philox, MatchesRandom123AndAten) {
  // Random123 known-answer vector: philox4x32_10, counter 0, key 0.
  const auto z = philox::philox4x32_10(0, 0, 0, 0, 0, 0);
  EXPECT_EQ(z.w[0], 0x6627e8d5u);
  EXPECT_EQ(z.w[1], 0xe169c58du);
  EXPECT_EQ(z.w[2], 0xbc57ac4cu);
  EXPECT_EQ(z.w[3], 0x9b00dbd8u);
  // ATen's engine at counter {offset, 0}: its first four outputs.
  for (uint64_t seed : {uint64_t{0}, uint64_t{42}, (uint64_t{1} << 40) + 7}) {
    for (uint64_t block : {uint64_t{0}, uint64_t{1}, uint64_t{12345}, (uint64_t{1} << 33) + 5}) {
      at::Philox4_32 engine(seed, 0, block);
      const auto w = philox::philox_block(seed, block);
      for (int j = 0; j < 4; ++j) EXPECT_EQ(w.w[j], engine()) << seed << " " << block << " " << j;
      EXPECT_EQ(philox::philox_word(seed, 4 * block + 2), w.w[2]);
    }
  }
}

TEST(QuantizeErrors, NameTheArgument) {
  auto x = at::randn({100});
  auto [q, s] = deepseek_ext::quantize_int8(x, 32);
  deepseek_ext::testing::expect_error([&] { deepseek_ext::quantize_int8(x, 48); },
               "block_size must be a positive multiple of 32 up to 4096, got 48");
  deepseek_ext::testing::expect_error([&] { deepseek_ext::quantize_int8(x.to(at::kDouble)); },
               "x must be float32, float16 or bfloat16");
  deepseek_ext::testing::expect_error([&] { deepseek_ext::quantize_int8(x, 32, true, 0, -3); }, "offset must be >= 0");
  deepseek_ext::testing::expect_error([&] { deepseek_ext::quantize_int8_ef_(x, at::zeros({99})); },
               "residual must have as many elements as x");
  deepseek_ext::testing::expect_error([&] { deepseek_ext::dequantize_int8(q, s, 64, at::kFloat, 100); },
               "scales must be a 1-D tensor of ceil(numel / block_size) = 2 elements");
  deepseek_ext::testing::expect_error([&] { deepseek_ext::dequantize_reduce_int8(q, s, 32, 1.0, at::kFloat); },
               "q must be a 2-D tensor");
}

}  // namespace
