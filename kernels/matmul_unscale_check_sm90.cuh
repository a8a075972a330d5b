// The fused sm90 weight-gradient GEMM of matmul_unscale_check as a template:
// CUTLASS 3 mainloop (TMA + warp-specialised wgmma) and an epilogue visitor
// tree that multiplies by *inv_scale, flags values that are inf/NaN after
// conversion and stores D. kernels/matmul_unscale_check_sm90.cu instantiates
// the library's two configurations. Include only from .cu files compiled for
// sm_90a.
#pragma once

// found_inf accumulates over all GEMMs of a step: the scalar reduction must
// never reset it to the identity when the kernel is set up.
#define CUTLASS_SKIP_REDUCTION_INIT 1

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/functional.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_conversion.h"
#include "deepseek_ext/detail/float_bits.h"

namespace deepseek_ext {
namespace ops {
namespace sm90 {

using namespace cute;

// Register-level reduction: flag = flag || nonfinite(Out(v)).
template <class Out>
struct NonFiniteAfterConversion {
  template <class T>
  struct Reduce {
    CUTLASS_HOST_DEVICE T operator()(T flag, T v) const {
      const Out o = cutlass::NumericConverter<Out, T, cutlass::FloatRoundStyle::round_to_nearest>{}(v);
      bool bad;
      if constexpr (sizeof(Out) == 4) {
        bad = bits::is_nonfinite_bits<bits::Fp32Format>(reinterpret_cast<const uint32_t&>(o));
      } else if constexpr (cute::is_same_v<Out, cutlass::half_t>) {
        bad = bits::is_nonfinite_bits<bits::Fp16Format>(o.raw());
      } else {
        bad = bits::is_nonfinite_bits<bits::Bf16Format>(o.raw());
      }
      return (flag != T(0) || bad) ? T(1) : T(0);
    }
  };
};

// Global-memory "reduction": a thread that saw a non-finite value writes 1.0;
// the others write nothing (no atomics on one address from every thread).
template <class T>
struct StoreFlagIfSet {
  CUTLASS_DEVICE void operator()(T* ptr, T const& v) const {
    if (v != T(0)) *ptr = T(1);
  }
};

}  // namespace sm90
}  // namespace ops
}  // namespace deepseek_ext

namespace cutlass {
// Idempotent stores of the same value are safe from many threads, which is all
// Sm90ScalarReduction asks of an "atomic" reduction here.
template <class T>
struct is_atomic<deepseek_ext::ops::sm90::StoreFlagIfSet<T>> : platform::true_type {};
}  // namespace cutlass

namespace deepseek_ext {
namespace ops {
namespace sm90 {

using namespace cutlass::epilogue::fusion;

// The persistent tile scheduler's swizzle: CUTLASS's max_swizzle_size, how
// many neighbouring output tiles (1, 2, 4 or 8) the CTAs of one wave visit
// together, which decides how much of A and B they share in L2. 8 rather than
// CUTLASS's default 1: on large square GEMMs the wider swizzle reuses more of
// A and B from L2 (results/gemm_h200.md, the swizzle columns); where B fits
// in L2 it makes no difference. Results do not depend on it.
constexpr int kSchedulerSwizzle = 8;

// KernelSchedule, EpilogueSchedule and TileScheduler default to what the
// library instantiates.
template <class ElementAB, class TileShape, class ClusterShape,
          class KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative,
          class EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative,
          class TileScheduler = cutlass::gemm::PersistentScheduler>
struct FusedWgradGemm {
  using ElementD = float;
  using ElementAcc = float;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using LayoutA = cutlass::layout::ColumnMajor;  // a = grad_out.t()
  using LayoutB = cutlass::layout::RowMajor;     // b = input
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16 / sizeof(ElementAB);
  static constexpr int kAlignD = 16 / sizeof(ElementD);

  using EVT = Sm90EVT<
      Sm90ScalarReduction<NonFiniteAfterConversion<ElementD>::template Reduce, StoreFlagIfSet, float, float,
                          kRound>,
      Sm90EVT<Sm90Compute<cutlass::multiplies, float, float, kRound>, Sm90ScalarBroadcast<float>,
               Sm90AccFetch>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, void, LayoutD, kAlignD, ElementD,
      LayoutD, kAlignD, EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, kAlignAB, ElementAB, LayoutB,
      kAlignAB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static bool run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                  const at::Tensor& found_inf, const at::Tensor& out) {
    const int M = static_cast<int>(a.size(0)), K = static_cast<int>(a.size(1)), N = static_cast<int>(b.size(1));
    typename Kernel::StrideA stride_a = make_stride(Int<1>{}, int64_t{a.stride(1)}, int64_t{0});
    typename Kernel::StrideB stride_b = make_stride(Int<1>{}, int64_t{b.stride(0)}, int64_t{0});
    typename Kernel::StrideD stride_d = make_stride(int64_t{out.stride(0)}, Int<1>{}, int64_t{0});

    cutlass::KernelHardwareInfo hw;
    hw.device_id = a.get_device();
    hw.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {reinterpret_cast<const ElementAB*>(a.const_data_ptr()), stride_a,
         reinterpret_cast<const ElementAB*>(b.const_data_ptr()), stride_b},
        {{}, nullptr, stride_d, out.data_ptr<float>(), stride_d},
        hw};
    args.scheduler.max_swizzle_size = kSchedulerSwizzle;
    // The raster order is CUTLASS's heuristic (walk along N unless the output
    // has more tiles along N than along M), the scheduler's default.
    // EVT arguments: {child..., node}. Reduction(child = multiplies(broadcast, acc)).
    args.epilogue.thread = {
        {
            {{1.0f}, {inv_scale.const_data_ptr<float>()}},  // Sm90ScalarBroadcast: value from the pointer
            {},                                             // Sm90AccFetch
            {}                                              // multiplies
        },
        {found_inf.data_ptr<float>(), 0.0f}  // Sm90ScalarReduction: target, identity
    };

    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
    const size_t ws_bytes = Gemm::get_workspace_size(args);
    at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, a.options().dtype(at::kByte));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    // A set-up CUTLASS declines (e.g. a TMA descriptor it cannot build) falls
    // back to the unfused route; a failed launch is an error.
    if (gemm.initialize(args, workspace.data_ptr(), stream) != cutlass::Status::kSuccess) return false;
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess,
                "matmul_unscale_check: CUTLASS sm90 kernel launch failed");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
};

}  // namespace sm90
}  // namespace ops
}  // namespace deepseek_ext
