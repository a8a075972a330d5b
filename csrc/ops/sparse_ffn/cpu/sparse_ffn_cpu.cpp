// Gated sparse FFN on the CPU.
//
// sparse_ffn_route: at::parallel_for over tokens picks each token's top-k
// blocks of scores + bias (a k-slot insertion list per token, descending);
// then a counting sort of the T * k (token, block) pairs by block gives
// `order` (stable: pairs of a block stay in token order) and `offsets`.
//
// sparse_ffn / sparse_ffn_backward: at::parallel_for over blocks. A block
// gathers its tokens' rows, runs its GEMMs through ATen (MKL; single-threaded
// inside the parallel region, one block per thread), applies the activation and
// the gate weights, and writes its per-pair results into a [T * k, d_model]
// buffer at its rows of `order`; a second at::parallel_for over tokens adds up
// each token's k rows (no atomics, deterministic). The weight gradients of a
// block are written directly into its own rows of grad_w1 / grad_w2. Only the
// selected blocks are ever multiplied.

#include <ATen/Dispatch.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "sparse_ffn/sparse_ffn.h"

namespace deepseek_ext {
namespace ops {
namespace {

// ---- routing ----

template <typename scalar_t>
void topk_rows(const scalar_t* scores, const float* bias, int64_t T, int64_t nb, int64_t k,
               int64_t* idx) {
  at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
    std::vector<float> best(k);
    std::vector<int64_t> arg(k);
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* s = scores + t * nb;
      int64_t filled = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const float v = static_cast<float>(s[b]) + bias[b];
        // Strict > keeps the lower block index first among ties.
        if (filled == k && !(v > best[k - 1])) continue;
        int64_t i = filled < k ? filled++ : k - 1;
        while (i > 0 && v > best[i - 1]) {
          best[i] = best[i - 1];
          arg[i] = arg[i - 1];
          --i;
        }
        best[i] = v;
        arg[i] = b;
      }
      std::copy(arg.begin(), arg.end(), idx + t * k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_ffn_route_cpu(const at::Tensor& scores_in,
                                                                    const at::Tensor& bias_in,
                                                                    int64_t k) {
  check_route_inputs(scores_in, bias_in, k, c10::DeviceType::CPU);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  const int64_t T = scores.size(0), nb = scores.size(1), P = T * k;
  const auto long_opts = scores.options().dtype(at::kLong);
  at::Tensor idx = at::empty({T, k}, long_opts);
  at::Tensor order = at::empty({P}, long_opts);
  at::Tensor offsets = at::zeros({nb + 1}, long_opts);
  if (T == 0) return {idx, order, offsets};
  int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sparse_ffn_route",
                                  [&] {
                                    topk_rows(scores.data_ptr<scalar_t>(),
                                              bias.data_ptr<float>(), T, nb, k, ip);
                                  });
  // Counting sort of the pairs by block.
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) ++off[ip[p] + 1];
  for (int64_t b = 0; b < nb; ++b) off[b + 1] += off[b];
  std::vector<int64_t> next(off, off + nb);
  int64_t* op = order.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) op[next[ip[p]]++] = p;
  return {idx, order, offsets};
}

// ---- per-token sum of the k per-pair rows ----

// out[t] = sum_j rows[pos[t * k + j]] for rows [P, D] (sorted order).
template <typename scalar_t>
void sum_pairs(const at::Tensor& rows, const std::vector<int64_t>& pos, int64_t k,
               at::Tensor& out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t T = out.size(0), D = out.size(1);
  const scalar_t* src = rows.const_data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      scalar_t* o = dst + t * D;
      const scalar_t* first = src + pos[t * k] * D;
      std::copy(first, first + D, o);
      for (int64_t j = 1; j < k; ++j) {
        const scalar_t* r = src + pos[t * k + j] * D;
        int64_t d = 0;
        for (; d + Vec::size() <= D; d += Vec::size()) {
          (Vec::loadu(o + d) + Vec::loadu(r + d)).store(o + d);
        }
        for (; d < D; ++d) o[d] = o[d] + r[d];
      }
    }
  });
}

void sum_pairs_dispatch(const at::Tensor& rows, const std::vector<int64_t>& pos, int64_t k,
                        at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sparse_ffn_sum",
                                  [&] { sum_pairs<scalar_t>(rows, pos, k, out); });
}

std::vector<int64_t> inverse_order(const at::Tensor& order) {
  const int64_t P = order.numel();
  const int64_t* op = order.const_data_ptr<int64_t>();
  std::vector<int64_t> pos(P);
  for (int64_t i = 0; i < P; ++i) {
    TORCH_CHECK(op[i] >= 0 && op[i] < P, "order must be a permutation of 0 .. tokens * k - 1, got ",
                op[i], " at ", i);
    pos[op[i]] = i;
  }
  return pos;
}

void check_offsets(const at::Tensor& offsets, int64_t P) {
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t nb = offsets.numel() - 1;
  TORCH_CHECK(off[0] == 0 && off[nb] == P, "offsets must run from 0 to tokens * k = ", P,
              ", got ", off[0], " .. ", off[nb]);
  for (int64_t b = 0; b < nb; ++b) {
    TORCH_CHECK(off[b] <= off[b + 1], "offsets must be non-decreasing, got ", off[b], " then ",
                off[b + 1], " at block ", b);
  }
}

// Blocks per parallel_for task: one, so that the two MKL-sized GEMMs of a block
// are the unit of work.
constexpr int64_t kBlockGrain = 1;

std::tuple<at::Tensor, at::Tensor> sparse_ffn_cpu(const at::Tensor& x_in, const at::Tensor& w1,
                                                  const std::optional<at::Tensor>& b1,
                                                  const at::Tensor& w2, const at::Tensor& gate_in,
                                                  const at::Tensor& order_in,
                                                  const at::Tensor& offsets_in, int64_t block_size,
                                                  c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const int64_t nb = check_sparse_ffn_inputs(x_in, w1, b1, w2, gate_in, order_in, offsets_in,
                                             block_size, act, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gate = gate_in.contiguous().view(-1);
  const at::Tensor order = order_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), k = gate_in.size(1), P = T * k;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  at::Tensor out = at::empty({T, D}, x.options());
  at::Tensor hidden = at::empty({P, mb}, x.options());
  if (P == 0) return {out, hidden};
  check_offsets(offsets, P);
  const std::vector<int64_t> pos = inverse_order(order);
  const bool has_b1 = b1.has_value() && b1->defined();
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  at::Tensor y = at::empty({P, D}, x.options());
  const int64_t* off = offsets.const_data_ptr<int64_t>();

  at::parallel_for(0, nb, kBlockGrain, [&](int64_t b0, int64_t b1_) {
    for (int64_t b = b0; b < b1_; ++b) {
      const int64_t s = off[b], n = off[b + 1] - off[b];
      if (n == 0) continue;
      const at::Tensor pairs = order.narrow(0, s, n);
      const at::Tensor tok = at::div(pairs, k, "floor");
      const at::Tensor xg = x.index_select(0, tok);
      at::Tensor a = hidden.narrow(0, s, n);
      const at::Tensor w1b = w1c.narrow(0, b * mb, mb);
      if (has_b1) {
        at::addmm_out(a, b1->narrow(0, b * mb, mb), xg, w1b.t());
      } else {
        at::mm_out(a, xg, w1b.t());
      }
      const at::Tensor h = activation_forward(a, act, block_size);
      h.mul_(gate.index_select(0, pairs).unsqueeze(1));
      at::Tensor yb = y.narrow(0, s, n);
      at::mm_out(yb, h, w2c.narrow(0, b * block_size, block_size));
    }
  });
  sum_pairs_dispatch(y, pos, k, out);
  return {out, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_ffn_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& gate_in, const at::Tensor& hidden_in,
    const at::Tensor& order_in, const at::Tensor& offsets_in, int64_t block_size,
    c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const int64_t nb =
      check_sparse_ffn_backward_inputs(grad_out_in, x_in, w1, w2, gate_in, hidden_in, order_in,
                                       offsets_in, block_size, act, c10::DeviceType::CPU);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gate = gate_in.contiguous().view(-1);
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), k = gate_in.size(1), P = T * k;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();

  at::Tensor grad_x = at::empty({T, D}, x.options());
  at::Tensor grad_w1 = at::empty_like(w1c);
  at::Tensor grad_b1 = at::empty({w1c.size(0)}, x.options());
  at::Tensor grad_w2 = at::empty_like(w2c);
  at::Tensor grad_gate = at::empty({P}, x.options());
  if (P == 0) {
    grad_w1.zero_();
    grad_b1.zero_();
    grad_w2.zero_();
    return {grad_x, grad_w1, grad_b1, grad_w2, grad_gate.view({T, k})};
  }
  check_offsets(offsets, P);
  const std::vector<int64_t> pos = inverse_order(order);
  at::Tensor dxs = at::empty({P, D}, x.options());
  const int64_t* off = offsets.const_data_ptr<int64_t>();

  at::parallel_for(0, nb, kBlockGrain, [&](int64_t b0, int64_t b1_) {
    for (int64_t b = b0; b < b1_; ++b) {
      const int64_t s = off[b], n = off[b + 1] - off[b];
      at::Tensor gw1 = grad_w1.narrow(0, b * mb, mb);
      at::Tensor gb1 = grad_b1.narrow(0, b * mb, mb);
      at::Tensor gw2 = grad_w2.narrow(0, b * block_size, block_size);
      if (n == 0) {
        gw1.zero_();
        gb1.zero_();
        gw2.zero_();
        continue;
      }
      const at::Tensor pairs = order.narrow(0, s, n);
      const at::Tensor tok = at::div(pairs, k, "floor");
      const at::Tensor gd = grad_out.index_select(0, tok);
      const at::Tensor w2b = w2c.narrow(0, b * block_size, block_size);
      const at::Tensor w1b = w1c.narrow(0, b * mb, mb);
      const at::Tensor a = hidden.narrow(0, s, n);
      const at::Tensor g = gate.index_select(0, pairs).unsqueeze(1);
      const at::Tensor gh = at::mm(gd, w2b.t());             // d loss / d (g * h)
      at::Tensor h = activation_forward(a, act, block_size);  // h = act(a)
      grad_gate.index_copy_(0, pairs, (gh * h).sum(1));
      at::mm_out(gw2, h.mul_(g).t(), gd);
      const at::Tensor da = activation_backward(gh.mul_(g), a, act, block_size);
      at::mm_out(gw1, da.t(), x.index_select(0, tok));
      at::sum_out(gb1, da, 0);
      at::Tensor dxb = dxs.narrow(0, s, n);
      at::mm_out(dxb, da, w1b);
    }
  });
  sum_pairs_dispatch(dxs, pos, k, grad_x);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_gate.view({T, k})};
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("sparse_ffn_route", &deepseek_ext::ops::sparse_ffn_route_cpu);
  m.impl("sparse_ffn", &deepseek_ext::ops::sparse_ffn_cpu);
  m.impl("sparse_ffn_backward", &deepseek_ext::ops::sparse_ffn_backward_cpu);
}
