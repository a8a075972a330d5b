// The gated sparse FFN's activations and its grouped-GEMM route, in
// device-agnostic ATen: the CUDA kernels (kernels/sparse_ffn.cu) call
// sparse_ffn_grouped and sparse_ffn_backward_grouped, the CPU kernels use the
// activation helpers.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "sparse_ffn/sparse_ffn.h"

namespace deepseek_ext {
namespace ops {

at::Tensor activation_forward(const at::Tensor& a, Activation act, int64_t block_size) {
  switch (act) {
    case Activation::kGelu:
      return at::gelu(a);
    case Activation::kGeluTanh:
      return at::gelu(a, "tanh");
    case Activation::kSilu:
      return at::silu(a);
    case Activation::kSwiglu:
      return at::silu(a.narrow(1, 0, block_size)).mul_(a.narrow(1, block_size, block_size));
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

at::Tensor activation_backward(const at::Tensor& dh, const at::Tensor& a, Activation act,
                               int64_t block_size) {
  switch (act) {
    case Activation::kGelu:
      return at::gelu_backward(dh, a);
    case Activation::kGeluTanh:
      return at::gelu_backward(dh, a, "tanh");
    case Activation::kSilu:
      return at::silu_backward(dh, a);
    case Activation::kSwiglu: {
      const at::Tensor g = a.narrow(1, 0, block_size);
      const at::Tensor u = a.narrow(1, block_size, block_size);
      at::Tensor da = at::empty_like(a);
      // h = silu(g) * u: dg = silu'(g) * (dh * u), du = dh * silu(g).
      da.narrow(1, 0, block_size).copy_(at::silu_backward(dh * u, g));
      at::Tensor du = da.narrow(1, block_size, block_size);
      at::mul_out(du, dh, at::silu(g));
      return da;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "unknown activation");
}

// ---- the grouped-GEMM route (device-agnostic ATen; the CUDA kernels use it) ----
//
// Rows are the pairs in `order` (grouped by block); at::_grouped_mm takes the
// cumulative group ends as an int32 device tensor, so nothing is read by the
// host. Per-pair outputs are summed per token through the inverse permutation
// (k rows per token, no atomics: deterministic).

namespace {

struct Grouping {
  at::Tensor tok;   // [P] token of each sorted row
  at::Tensor pos;   // [P] sorted row of each pair p
  at::Tensor ends;  // [n_blocks] int32 cumulative ends
  at::Tensor blk;   // [P] block of each sorted row
};

Grouping make_grouping(const at::Tensor& order, const at::Tensor& offsets, int64_t k) {
  Grouping g;
  const int64_t P = order.numel();
  g.tok = at::div(order, k, "floor");
  at::Tensor rows = at::arange(P, order.options());
  g.pos = at::empty_like(order).index_copy_(0, order, rows);
  at::Tensor ends64 = offsets.slice(0, 1);
  g.ends = ends64.to(at::kInt);
  g.blk = at::searchsorted(ends64, rows, /*out_int32=*/false, /*right=*/true);
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_ffn_grouped(const at::Tensor& x, const at::Tensor& w1,
                                                      const std::optional<at::Tensor>& b1,
                                                      const at::Tensor& w2, const at::Tensor& gate,
                                                      const at::Tensor& order,
                                                      const at::Tensor& offsets,
                                                      int64_t block_size, Activation act) {
  const int64_t T = x.size(0), D = x.size(1), k = gate.size(1);
  const int64_t nb = offsets.numel() - 1;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  const Grouping g = make_grouping(order, offsets, k);
  const at::Tensor xs = x.index_select(0, g.tok);
  const at::Tensor gs = gate.reshape(-1).index_select(0, order).unsqueeze(1);
  at::Tensor a = at::_grouped_mm(xs, w1.view({nb, mb, D}).transpose(1, 2), g.ends);
  if (b1.has_value() && b1->defined()) a.add_(b1->view({nb, mb}).index_select(0, g.blk));
  const at::Tensor h = activation_forward(a, act, block_size).mul_(gs);
  const at::Tensor y = at::_grouped_mm(h, w2.view({nb, block_size, D}), g.ends);
  at::Tensor out = y.index_select(0, g.pos).view({T, k, D}).sum(1);
  return {out, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_ffn_backward_grouped(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& gate, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, int64_t block_size, Activation act) {
  const int64_t T = x.size(0), D = x.size(1), k = gate.size(1);
  const int64_t nb = offsets.numel() - 1;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  const Grouping g = make_grouping(order, offsets, k);
  const at::Tensor xs = x.index_select(0, g.tok);
  const at::Tensor gd = grad_out.index_select(0, g.tok);
  const at::Tensor gs = gate.reshape(-1).index_select(0, order).unsqueeze(1);
  const at::Tensor gh = at::_grouped_mm(gd, w2.view({nb, block_size, D}).transpose(1, 2), g.ends);
  const at::Tensor h = activation_forward(hidden, act, block_size);
  at::Tensor grad_gate = at::empty_like(gate).view(-1).index_copy_(0, order, (gh * h).sum(1));
  // Weight gradients: 2-D x 2-D grouped GEMMs, groups along the pair dimension.
  at::Tensor grad_w2 = at::_grouped_mm((h * gs).t(), gd, g.ends).view({nb * block_size, D});
  const at::Tensor da = activation_backward(gh * gs, hidden, act, block_size);
  at::Tensor grad_w1 = at::_grouped_mm(da.t(), xs, g.ends).view({nb * mb, D});
  at::Tensor grad_b1 = at::zeros({nb, mb}, da.options()).index_add_(0, g.blk, da).view(-1);
  const at::Tensor dxs = at::_grouped_mm(da, w1.view({nb, mb, D}), g.ends);
  at::Tensor grad_x = dxs.index_select(0, g.pos).view({T, k, D}).sum(1);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_gate.view({T, k})};
}

}  // namespace ops
}  // namespace deepseek_ext
