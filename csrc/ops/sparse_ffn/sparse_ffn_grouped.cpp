// The gated sparse FFN's activations and its grouped-GEMM route, in
// device-agnostic ATen plus the sparse_ffn_gather / sparse_ffn_combine ops:
// the CUDA kernels (kernels/sparse_ffn.cu) call sparse_ffn_grouped and
// sparse_ffn_backward_grouped, the CPU kernels use the activation helpers.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/torch_compat.h"
#include "deepseek_ext/ops.h"
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
// Rows are the pairs in `order` (grouped by block): sparse_ffn_gather writes
// x's rows in that order, the grouped GEMM (compat::grouped_mm, torch_compat.h)
// takes the cumulative group ends as an int32 device tensor (nothing is read by the host), and
// sparse_ffn_combine sums each token's k gated rows in one pass (no atomics:
// deterministic). The backward gathers x again rather than keeping the
// forward's [T * k, d_model] copy alive between forward and backward: with it,
// the step's peak memory would exceed the dense FFN's whenever k * d_model >
// d_ff (16 blocks at density 0.3 with d_ff = 4 d_model: k = 5), and a second
// gather costs one read and one write of those rows.

namespace {

// The cumulative ends of the groups, int32, as compat::grouped_mm takes them.
at::Tensor group_ends(const at::Tensor& offsets) { return offsets.slice(0, 1).to(at::kInt); }

// The block of each row in block order (for the bias b1).
at::Tensor row_blocks(const at::Tensor& offsets, int64_t P) {
  return at::searchsorted(offsets.slice(0, 1), at::arange(P, offsets.options()),
                          /*out_int32=*/false, /*right=*/true);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_ffn_grouped(const at::Tensor& x, const at::Tensor& w1,
                                                      const std::optional<at::Tensor>& b1,
                                                      const at::Tensor& w2, const at::Tensor& gate,
                                                      const at::Tensor& order,
                                                      const at::Tensor& offsets,
                                                      int64_t block_size, Activation act) {
  const int64_t T = x.size(0), D = x.size(1), k = gate.size(1), P = T * k;
  const int64_t nb = offsets.numel() - 1;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  if (P == 0) return {at::zeros({T, D}, x.options()), at::empty({0, mb}, x.options())};
  const at::Tensor ends = group_ends(offsets);
  at::Tensor a;
  {  // the gathered rows live only as long as the first GEMM needs them
    const at::Tensor xs = deepseek_ext::sparse_ffn_gather(x, order, k);
    a = compat::grouped_mm(xs, w1.view({nb, mb, D}).transpose(1, 2), ends);
  }
  if (b1.has_value() && b1->defined()) {
    a.add_(b1->view({nb, mb}).index_select(0, row_blocks(offsets, P)));
  }
  const at::Tensor y =
      compat::grouped_mm(activation_forward(a, act, block_size), w2.view({nb, block_size, D}), ends);
  return {deepseek_ext::sparse_ffn_combine(y, order, k, gate), a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_ffn_backward_grouped(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& gate, const at::Tensor& hidden, const at::Tensor& order,
    const at::Tensor& offsets, int64_t block_size, Activation act) {
  const int64_t T = x.size(0), D = x.size(1), k = gate.size(1), P = T * k;
  const int64_t nb = offsets.numel() - 1;
  const int64_t mb = w1_rows_per_unit(act) * block_size;
  if (P == 0) {
    return {at::zeros({T, D}, x.options()), at::zeros_like(w1), at::zeros({w1.size(0)}, x.options()),
            at::zeros_like(w2), at::zeros_like(gate)};
  }
  const at::Tensor ends = group_ends(offsets);
  const at::Tensor gs = gate.reshape(-1).index_select(0, order).unsqueeze(1);
  const at::Tensor h = activation_forward(hidden, act, block_size);
  at::Tensor grad_gate, grad_w2, da;
  {  // the gathered output gradient, freed before x is gathered
    const at::Tensor gd = deepseek_ext::sparse_ffn_gather(grad_out, order, k);
    const at::Tensor gh =
        compat::grouped_mm(gd, w2.view({nb, block_size, D}).transpose(1, 2), ends);
    grad_gate = at::empty_like(gate).view(-1).index_copy_(0, order, (gh * h).sum(1));
    // Weight gradients: 2-D x 2-D grouped GEMMs, groups along the pair dimension.
    grad_w2 = compat::grouped_mm((h * gs).t(), gd, ends).view({nb * block_size, D});
    da = activation_backward(gh * gs, hidden, act, block_size);
  }
  at::Tensor grad_w1;
  {
    const at::Tensor xs = deepseek_ext::sparse_ffn_gather(x, order, k);
    grad_w1 = compat::grouped_mm(da.t(), xs, ends).view({nb * mb, D});
  }
  at::Tensor grad_b1 =
      at::zeros({nb, mb}, da.options()).index_add_(0, row_blocks(offsets, P), da).view(-1);
  at::Tensor grad_x =
      deepseek_ext::sparse_ffn_combine(compat::grouped_mm(da, w1.view({nb, mb, D}), ends), order, k);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_gate.view({T, k})};
}

}  // namespace ops
}  // namespace deepseek_ext
