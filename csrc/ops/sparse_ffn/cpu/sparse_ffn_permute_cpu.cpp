// CPU kernels of sparse_ffn_gather and sparse_ffn_combine, and the row
// movers the CPU sparse_ffn kernels share with them (see
// sparse_ffn_permute_cpu.h). They are the CPU twins of the CUDA kernels in
// kernels/sparse_ffn_permute.cu: the same function, the same order of
// summation (j ascending) and the same accumulation type.

#include "sparse_ffn/cpu/sparse_ffn_permute_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sparse_ffn/sparse_ffn.h"

namespace deepseek_ext {
namespace ops {

at::Tensor inverse_permutation_cpu(const at::Tensor& order) {
  const int64_t P = order.numel();
  at::Tensor pos = at::empty({P}, order.options());
  int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* op = order.const_data_ptr<int64_t>();
  std::fill(pp, pp + P, int64_t{-1});
  for (int64_t i = 0; i < P; ++i) {
    TORCH_CHECK(op[i] >= 0 && op[i] < P && pp[op[i]] < 0,
                "order must be a permutation of 0 .. tokens * k - 1, got ", op[i], " at ", i);
    pp[op[i]] = i;
  }
  return pos;
}

void gather_rows_cpu(const at::Tensor& x, const int64_t* pairs, int64_t n, int64_t k,
                     at::Tensor& dst) {
  const int64_t D = x.size(1);
  const int64_t row_bytes = D * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* out = static_cast<char*>(dst.data_ptr());
  // Rows per task: about 64 KiB of copying.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      std::memcpy(out + i * row_bytes, src + (pairs[i] / k) * row_bytes, row_bytes);
    }
  });
}

namespace {

template <typename scalar_t>
void combine_rows(const scalar_t* y, const int64_t* pos, const scalar_t* gate, int64_t T,
                  int64_t k, int64_t D, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(k * D, 1));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      using Vec = at::vec::Vectorized<scalar_t>;
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* o = out + t * D;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = t * k + j;
          const scalar_t* r = y + pos[p] * D;
          const scalar_t g = gate != nullptr ? gate[p] : scalar_t(1);
          const Vec gv(g);
          int64_t d = 0;
          if (j == 0) {
            for (; d + Vec::size() <= D; d += Vec::size()) (gv * Vec::loadu(r + d)).store(o + d);
            for (; d < D; ++d) o[d] = g * r[d];
          } else {
            for (; d + Vec::size() <= D; d += Vec::size()) {
              at::vec::fmadd(gv, Vec::loadu(r + d), Vec::loadu(o + d)).store(o + d);
            }
            for (; d < D; ++d) o[d] = std::fma(g, r[d], o[d]);
          }
        }
      }
    } else {
      // Half / bfloat16: a float32 row accumulator per task.
      std::vector<acc_t> acc(D);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = t * k + j;
          const scalar_t* r = y + pos[p] * D;
          const acc_t g = gate != nullptr ? static_cast<acc_t>(gate[p]) : acc_t(1);
          for (int64_t d = 0; d < D; ++d) acc[d] = std::fma(g, static_cast<acc_t>(r[d]), acc[d]);
        }
        scalar_t* o = out + t * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

}  // namespace

void combine_rows_cpu(const at::Tensor& y, const at::Tensor& pos, int64_t k,
                      const std::optional<at::Tensor>& gate, at::Tensor& out) {
  const int64_t T = out.size(0), D = out.size(1);
  const bool has_gate = gate.has_value() && gate->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "sparse_ffn_combine", [&] {
    combine_rows(y.const_data_ptr<scalar_t>(), pos.const_data_ptr<int64_t>(),
                 has_gate ? gate->const_data_ptr<scalar_t>() : nullptr, T, k, D,
                 out.data_ptr<scalar_t>());
  });
}

at::Tensor cpu_workspace(WorkspaceSlot slot, int64_t rows, int64_t cols, at::ScalarType dtype) {
  thread_local std::array<at::Tensor, 3> buffers;
  at::Tensor& buf = buffers[static_cast<size_t>(slot)];
  const int64_t need = rows * cols;
  if (!buf.defined() || buf.scalar_type() != dtype || buf.numel() < need) {
    // A normal tensor even when the caller runs under inference mode: the
    // kernels write into it through out= operators on later calls too.
    c10::InferenceMode not_inference(false);
    buf = at::Tensor();  // free the old one first
    buf = at::empty({need}, at::TensorOptions().dtype(dtype));
  }
  return buf.narrow(0, 0, need).view({rows, cols});
}

namespace {

at::Tensor sparse_ffn_gather_cpu(const at::Tensor& x_in, const at::Tensor& order_in, int64_t k) {
  check_gather_inputs(x_in, order_in, k, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const int64_t P = order.numel(), T = x.size(0);
  at::Tensor out = at::empty({P, x.size(1)}, x.options());
  const int64_t* op = order.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < P; ++i) {
    TORCH_CHECK(op[i] >= 0 && op[i] / k < T, "order must hold pairs t * k + j of the ", T,
                " tokens of x (k = ", k, "), got ", op[i], " at ", i);
  }
  if (P > 0 && x.size(1) > 0) gather_rows_cpu(x, op, P, k, out);
  return out;
}

at::Tensor sparse_ffn_combine_cpu(const at::Tensor& y_in, const at::Tensor& order_in, int64_t k,
                                  const std::optional<at::Tensor>& gate_in) {
  check_combine_inputs(y_in, order_in, k, gate_in, c10::DeviceType::CPU);
  const at::Tensor y = y_in.contiguous();
  const at::Tensor pos = inverse_permutation_cpu(order_in.contiguous());
  std::optional<at::Tensor> gate;
  if (gate_in.has_value() && gate_in->defined()) gate = gate_in->contiguous();
  at::Tensor out = at::empty({y.size(0) / k, y.size(1)}, y.options());
  if (out.numel() > 0) combine_rows_cpu(y, pos, k, gate, out);
  return out;
}

}  // namespace
}  // namespace ops
}  // namespace deepseek_ext

TORCH_LIBRARY_IMPL(deepseek_ext, CPU, m) {
  m.impl("sparse_ffn_gather", &deepseek_ext::ops::sparse_ffn_gather_cpu);
  m.impl("sparse_ffn_combine", &deepseek_ext::ops::sparse_ffn_combine_cpu);
}
