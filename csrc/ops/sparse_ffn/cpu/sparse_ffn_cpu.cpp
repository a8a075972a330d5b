// Gated sparse FFN on the CPU.
//
// sparse_ffn_route: at::parallel_for over tokens picks each token's top-k
// blocks of scores + bias (a k-slot insertion list per token, descending);
// then a counting sort of the T * k (token, block) pairs by block gives
// `order` (stable: pairs of a block stay in token order) and `offsets`.
//
// sparse_ffn / sparse_ffn_backward: at::parallel_for over blocks. A block
// walks its pairs in tiles of kTileRows: it gathers the tiles' token rows into
// a per-thread tile buffer, runs its GEMMs through ATen (MKL), one block per
// thread at a time, and writes the tile's [rows, d_model] result (forward:
// the block's output y; backward: d loss / d x) into its rows of a
// block-ordered [T * k, d_model] buffer. One pass then sums each token's k
// rows (combine_rows_cpu: forward with the gate weights), so no two threads
// write one row and the result does not depend on the thread count. The
// weight gradients of a block are accumulated over its tiles directly into
// its own rows of grad_w1 / grad_w2. Only the selected blocks are ever
// multiplied. The [T * k, d_model] and tile buffers are per-thread
// workspaces kept between calls (cpu_workspace), so a training step of fixed
// shape allocates only its outputs.

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

#include "common/cpu_parallel.h"
#include "deepseek_ext/detail/topk.h"
#include "sparse_ffn/cpu/sparse_ffn_permute_cpu.h"
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
        detail::topk_offer(static_cast<float>(s[b]) + bias[b], b, best.data(), arg.data(), k, filled);
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

// Blocks per parallel_for task: one (its GEMMs are the unit of work); rows
// per tile: a block's pairs are processed in tiles whose gathered inputs stay
// in the core's cache.
constexpr int64_t kBlockGrain = 1;
constexpr int64_t kTileRows = 512;

// act(a) written into h [n, block_size] (a [n, m * block_size]): the
// activation_forward of sparse_ffn_grouped.cpp without a temporary.
void activation_forward_out(at::Tensor& h, const at::Tensor& a, Activation act,
                            int64_t block_size) {
  switch (act) {
    case Activation::kGelu:
      at::gelu_out(h, a);
      return;
    case Activation::kGeluTanh:
      at::gelu_out(h, a, "tanh");
      return;
    case Activation::kSilu:
      at::silu_out(h, a);
      return;
    case Activation::kSwiglu:
      at::silu_out(h, a.narrow(1, 0, block_size));
      h.mul_(a.narrow(1, block_size, block_size));
      return;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

// d loss / d a written into da [n, m * block_size] from dh = d loss / d act(a).
void activation_backward_out(at::Tensor& da, const at::Tensor& dh, const at::Tensor& a,
                             Activation act, int64_t block_size) {
  switch (act) {
    case Activation::kGelu:
      at::gelu_backward_out(da, dh, a);
      return;
    case Activation::kGeluTanh:
      at::gelu_backward_out(da, dh, a, "tanh");
      return;
    case Activation::kSilu:
      at::silu_backward_out(da, dh, a);
      return;
    case Activation::kSwiglu: {
      // h = silu(g) * u: dg = silu'(g) * (dh * u), du = dh * silu(g).
      const at::Tensor g = a.narrow(1, 0, block_size);
      const at::Tensor u = a.narrow(1, block_size, block_size);
      at::Tensor dg = da.narrow(1, 0, block_size);
      at::Tensor du = da.narrow(1, block_size, block_size);
      at::mul_out(du, dh, u);  // dh * u, consumed at once
      at::silu_backward_out(dg, du, g);
      at::silu_out(du, g);
      du.mul_(dh);
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

// This thread's [kTileRows, D] slice number `which` of the tile workspace
// (`per_thread` slices per thread).
at::Tensor thread_tile(const at::Tensor& tiles, int64_t per_thread, int64_t which) {
  const int tid = at::get_thread_num();
  TORCH_INTERNAL_ASSERT(tid >= 0 && tid * per_thread * kTileRows < tiles.size(0));
  return tiles.narrow(0, (tid * per_thread + which) * kTileRows, kTileRows);
}

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
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), k = gate_in.size(1), P = T * k;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  at::Tensor hidden = at::empty({P, mb}, x.options());
  if (P == 0) return {at::zeros({T, D}, x.options()), hidden};
  check_offsets(offsets, P);
  const at::Tensor pos = inverse_permutation_cpu(order);
  const bool has_b1 = b1.has_value() && b1->defined();
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t* ord = order.const_data_ptr<int64_t>();
  // y: every pair's block output, in block order (reused across calls), then
  // out[t] = sum_j gate[t, j] * y[pos[t * k + j]] in one pass.
  at::Tensor y = cpu_workspace(WorkspaceSlot::kRows, P, D, x.scalar_type());
  const at::Tensor tiles =
      cpu_workspace(WorkspaceSlot::kTiles, at::get_num_threads() * kTileRows, D, x.scalar_type());
  const at::Tensor hidden_tiles = cpu_workspace(
      WorkspaceSlot::kHiddenTiles, at::get_num_threads() * kTileRows, block_size, x.scalar_type());

  parallel_for_with_caller_state(0, nb, kBlockGrain, [&](int64_t b0, int64_t b1_) {
    at::Tensor xg_buf = thread_tile(tiles, 1, 0);
    at::Tensor h_buf = thread_tile(hidden_tiles, 1, 0);
    for (int64_t b = b0; b < b1_; ++b) {
      const at::Tensor w1b = w1c.narrow(0, b * mb, mb);
      const at::Tensor w2b = w2c.narrow(0, b * block_size, block_size);
      for (int64_t s = off[b]; s < off[b + 1]; s += kTileRows) {
        const int64_t n = std::min(kTileRows, off[b + 1] - s);
        at::Tensor xg = xg_buf.narrow(0, 0, n);
        gather_rows_cpu(x, ord + s, n, k, xg);
        at::Tensor a = hidden.narrow(0, s, n);
        if (has_b1) {
          at::addmm_out(a, b1->narrow(0, b * mb, mb), xg, w1b.t());
        } else {
          at::mm_out(a, xg, w1b.t());
        }
        at::Tensor h = h_buf.narrow(0, 0, n);
        activation_forward_out(h, a, act, block_size);
        at::Tensor yb = y.narrow(0, s, n);
        at::mm_out(yb, h, w2b);
      }
    }
  });
  at::Tensor out = at::empty({T, D}, x.options());
  combine_rows_cpu(y, pos, k, gate, out);
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

  at::Tensor grad_w1 = at::empty_like(w1c);
  at::Tensor grad_b1 = at::empty({w1c.size(0)}, x.options());
  at::Tensor grad_w2 = at::empty_like(w2c);
  at::Tensor grad_gate = at::empty({P}, x.options());
  if (P == 0) {
    grad_w1.zero_();
    grad_b1.zero_();
    grad_w2.zero_();
    return {at::zeros({T, D}, x.options()), grad_w1, grad_b1, grad_w2, grad_gate.view({T, k})};
  }
  check_offsets(offsets, P);
  const at::Tensor pos = inverse_permutation_cpu(order);
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t* ord = order.const_data_ptr<int64_t>();
  // dxs: d loss / d x of every pair, in block order (reused across calls),
  // summed per token at the end as the forward's combine does.
  at::Tensor dxs = cpu_workspace(WorkspaceSlot::kRows, P, D, x.scalar_type());
  const at::Tensor tiles = cpu_workspace(WorkspaceSlot::kTiles,
                                         2 * at::get_num_threads() * kTileRows, D, x.scalar_type());
  // Per thread: h, gh and their product (block_size wide) and da (m * block_size).
  const at::Tensor hidden_tiles = cpu_workspace(
      WorkspaceSlot::kHiddenTiles, 4 * at::get_num_threads() * kTileRows, mb, x.scalar_type());

  parallel_for_with_caller_state(0, nb, kBlockGrain, [&](int64_t b0, int64_t b1_) {
    at::Tensor xg_buf = thread_tile(tiles, 2, 0);
    at::Tensor gd_buf = thread_tile(tiles, 2, 1);
    at::Tensor h_buf = thread_tile(hidden_tiles, 4, 0).narrow(1, 0, block_size);
    at::Tensor gh_buf = thread_tile(hidden_tiles, 4, 1).narrow(1, 0, block_size);
    at::Tensor prod_buf = thread_tile(hidden_tiles, 4, 2).narrow(1, 0, block_size);
    at::Tensor da_buf = thread_tile(hidden_tiles, 4, 3);
    for (int64_t b = b0; b < b1_; ++b) {
      at::Tensor gw1 = grad_w1.narrow(0, b * mb, mb);
      at::Tensor gb1 = grad_b1.narrow(0, b * mb, mb);
      at::Tensor gw2 = grad_w2.narrow(0, b * block_size, block_size);
      if (off[b] == off[b + 1]) {  // no pair chose this block
        gw1.zero_();
        gb1.zero_();
        gw2.zero_();
        continue;
      }
      const at::Tensor w2b = w2c.narrow(0, b * block_size, block_size);
      const at::Tensor w1b = w1c.narrow(0, b * mb, mb);
      for (int64_t s = off[b]; s < off[b + 1]; s += kTileRows) {
        const int64_t n = std::min(kTileRows, off[b + 1] - s);
        const at::Tensor pairs = order.narrow(0, s, n);
        at::Tensor gd = gd_buf.narrow(0, 0, n);
        at::Tensor xg = xg_buf.narrow(0, 0, n);
        gather_rows_cpu(grad_out, ord + s, n, k, gd);
        gather_rows_cpu(x, ord + s, n, k, xg);
        const at::Tensor a = hidden.narrow(0, s, n);
        const at::Tensor g = gate.index_select(0, pairs).unsqueeze(1);
        at::Tensor gh = gh_buf.narrow(0, 0, n);  // d loss / d (g * h)
        at::mm_out(gh, gd, w2b.t());
        at::Tensor h = h_buf.narrow(0, 0, n);  // h = act(a)
        activation_forward_out(h, a, act, block_size);
        at::Tensor prod = prod_buf.narrow(0, 0, n);
        at::mul_out(prod, gh, h);
        grad_gate.index_copy_(0, pairs, prod.sum(1));
        // The first tile writes the block's weight gradients, later ones add.
        const double beta = s == off[b] ? 0.0 : 1.0;
        gw2.addmm_(h.mul_(g).t(), gd, beta);
        at::Tensor da = da_buf.narrow(0, 0, n);
        activation_backward_out(da, gh.mul_(g), a, act, block_size);
        gw1.addmm_(da.t(), xg, beta);
        if (beta == 0.0) {
          at::sum_out(gb1, da, 0);
        } else {
          gb1.add_(da.sum(0));
        }
        at::Tensor dx = dxs.narrow(0, s, n);
        at::mm_out(dx, da, w1b);
      }
    }
  });
  at::Tensor grad_x = at::empty({T, D}, x.options());
  combine_rows_cpu(dxs, pos, k, std::nullopt, grad_x);
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
