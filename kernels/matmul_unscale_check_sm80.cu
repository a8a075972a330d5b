// matmul_unscale_check on Ampere (sm_80; sm_86/87/89 run the same sm_80 code):
// one CUTLASS 2.x kernel, a multistage cp.async + mma.sync mainloop and an
// epilogue visitor tree (Sm80EVT) that
//   1. multiplies the float32 accumulators by *inv_scale (read on the device),
//   2. converts to the output dtype and stores D,
//   3. flags any stored value that is inf/NaN (checked on the converted bits,
//      so fp16 values above 65504 count), one atomic per CTA into found_inf,
// so the GEMM, the unscale and the overflow check are one pass over the output.
//
// Instantiated for the weight-gradient layout only, as the sm90 kernel is:
// a = grad_out^T (a transposed view: column-major A), b = input (row-major B),
// float16 or bfloat16 operands, output float32 or the operands' dtype. Two tile
// shapes, chosen by pick_large_tile(). Anything else returns false and takes the
// unfused cuBLAS route in matmul_unscale_check.cu.
//
// Where it runs: the kernel body is compiled only into images built for an
// 8.x architecture (__CUDA_ARCH__ in [800, 900)). The host asks the CUDA runtime
// which image it loads for the current device (cudaFuncAttributes::ptxVersion,
// the virtual architecture, as CUB does) and declines when that image is not an
// 8.x one. With the default arch list "8.0;9.0a" that means: Ampere GPUs take
// this kernel, Hopper loads the sm_90a image (the sm90 kernel or cuBLAS) and this
// file costs the 9.0a pass almost nothing. A build for "8.0+PTX" runs it on
// newer GPUs through the driver's JIT (how the GPU check can verify it on Hopper).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <atomic>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal_base.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/numeric_conversion.h"
// The visitor headers rely on the kernel headers above being included first.
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "deepseek_ext/detail/float_bits.h"

namespace deepseek_ext {
namespace ops {
namespace sm80 {

using namespace cute;
using cutlass::epilogue::threadblock::EmptyCallbacks;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// The raw bits of one stored value and the format they are read in.
template <class T>
struct StoredBits;
template <>
struct StoredBits<float> {
  using Format = bits::Fp32Format;
  CUTLASS_DEVICE static uint32_t of(float v) { return __float_as_uint(v); }
};
template <>
struct StoredBits<cutlass::half_t> {
  using Format = bits::Fp16Format;
  CUTLASS_DEVICE static uint16_t of(cutlass::half_t v) { return v.raw(); }
};
template <>
struct StoredBits<cutlass::bfloat16_t> {
  using Format = bits::Bf16Format;
  CUTLASS_DEVICE static uint16_t of(cutlass::bfloat16_t v) { return v.raw(); }
};

// EVT node: found_inf = 1 when any in-bounds value of its input, converted to
// ElementD with the store's own converter, is inf or NaN. Each thread keeps the
// largest magnitude bits it saw (float_bits.h: a comparison no fast-math flag
// can remove); the CTA ORs them in end_epilogue and thread 0 sets the flag with
// one atomic. found_inf accumulates over the GEMMs of a step: never reset here.
template <class ThreadMap, class ElementD>
struct VisitorFlagNonFinite {
  struct Arguments {
    float* ptr_flag = nullptr;
  };
  using Params = Arguments;
  struct SharedStorage {};

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }

  CUTLASS_HOST_DEVICE VisitorFlagNonFinite() {}
  CUTLASS_HOST_DEVICE VisitorFlagNonFinite(Params const& params, SharedStorage const&) : params_ptr(&params) {}

  Params const* params_ptr = nullptr;

  template <class CTensor, class ProblemShape>
  struct Callbacks : EmptyCallbacks {
    using Format = typename StoredBits<ElementD>::Format;
    using bits_t = typename Format::bits_type;

    CUTLASS_DEVICE Callbacks(CTensor&& coords, ProblemShape problem_shape, float* ptr_flag, int thread_idx)
        : coords(cute::forward<CTensor>(coords)), problem_shape(problem_shape), ptr_flag(ptr_flag),
          thread_idx(thread_idx) {}

    CTensor coords;  // (FRAGMENT_COLUMN, FRAGMENT_ROW, ITERATION) -> (m, n, l) of a fragment's first value
    ProblemShape problem_shape;
    float* ptr_flag;
    int thread_idx;
    bits_t max_magnitude = 0;

    template <class ElementAccumulator, class ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementInput, FragmentSize> visit(int iter_idx, int row_idx, int column_idx, int,
                                                           cutlass::Array<ElementAccumulator, FragmentSize> const&,
                                                           cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      // A fragment is one vector of kAlignD values along N and N % kAlignD == 0,
      // so its first value decides whether all of it is inside the output.
      if (elem_less(coords(column_idx, row_idx, iter_idx), problem_shape)) {
        const cutlass::Array<ElementD, FragmentSize> stored =
            cutlass::NumericArrayConverter<ElementD, ElementInput, FragmentSize, kRound>{}(frg_input);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < FragmentSize; ++i) {
          const bits_t m = bits::magnitude_bits<Format>(StoredBits<ElementD>::of(stored[i]));
          max_magnitude = m > max_magnitude ? m : max_magnitude;
        }
      }
      return frg_input;
    }

    // Every thread of the CTA runs the epilogue to its end, so the barrier is uniform.
    CUTLASS_DEVICE void end_epilogue() {
      if (__syncthreads_or(bits::max_magnitude_is_nonfinite<Format>(max_magnitude)) && thread_idx == 0) {
        atomicExch(ptr_flag, 1.0f);
      }
    }
  };

  template <class ProblemShape>
  CUTLASS_DEVICE auto get_callbacks(cutlass::gemm::GemmCoord threadblock_tile_offset, int thread_idx,
                                    ProblemShape problem_shape) {
    Tensor coords = group_modes<2, 5>(ThreadMap::partition(make_identity_tensor(problem_shape), thread_idx,
                                                           threadblock_tile_offset)(_0{}, _, _, _, _, _));
    return Callbacks<decltype(coords), ProblemShape>(cute::move(coords), problem_shape, params_ptr->ptr_flag,
                                                     thread_idx);
  }
};

// The kernel with its body compiled only for 8.x images (see the file comment):
// a 9.0a pass instantiates the host side and an empty device function.
template <class Kernel>
struct Sm8xOnly : Kernel {
  CUTLASS_DEVICE static void invoke(typename Kernel::Params const& params,
                                    typename Kernel::SharedStorage& shared_storage) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && __CUDA_ARCH__ < 900
    Kernel::invoke(params, shared_storage);
#endif
  }
};

// True when the image the runtime loads for `device` was compiled for an 8.x
// virtual architecture, i.e. holds the kernel body. Asked once per device.
template <class Kernel>
bool body_loaded_for(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int8_t> known[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= kMaxDevices) return false;
  int8_t k = known[device].load(std::memory_order_relaxed);
  if (k == 0) {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, cutlass::Kernel2<Kernel>) == cudaSuccess) {
      k = attr.ptxVersion >= 80 && attr.ptxVersion < 90 ? 1 : 2;
    } else {
      (void)cudaGetLastError();  // no image for this device: clear the non-sticky error
      k = 2;
    }
    known[device].store(k, std::memory_order_relaxed);
  }
  return k == 1;
}

template <class ElementAB, class ElementD, class TileShape, class WarpShape, int kStages>
struct FusedWgradGemm {
  using LayoutA = cutlass::layout::ColumnMajor;  // a = grad_out.t()
  using LayoutB = cutlass::layout::RowMajor;     // b = input
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16 / sizeof(ElementAB);
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  static constexpr int kEpilogueStages = 1;
  using Map = cutlass::epilogue::threadblock::OutputTileThreadLayout<TileShape, WarpShape, ElementD, kAlignD,
                                                                     kEpilogueStages>;

  // flag_nonfinite(store(inv_scale * acc)); children are evaluated first.
  using Scale = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorCompute<cutlass::multiplies, float, float, kRound>,
      cutlass::epilogue::threadblock::VisitorScalarBroadcast<float>,
      cutlass::epilogue::threadblock::VisitorAccFetch>;
  using Store = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorAuxStore<Map, ElementD, kRound, Stride<int64_t, _1, int64_t>>, Scale>;
  using EVT = cutlass::epilogue::threadblock::Sm80EVT<VisitorFlagNonFinite<Map, ElementD>, Store>;

  using Kernel = Sm8xOnly<typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementAB, LayoutA, cutlass::ComplexTransform::kNone, kAlignAB,  //
      ElementAB, LayoutB, cutlass::ComplexTransform::kNone, kAlignAB,  //
      ElementD, LayoutD, kAlignD, float, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape,
      WarpShape, cutlass::gemm::GemmShape<16, 8, 16>, EVT, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>,
      kStages, cutlass::arch::OpMultiplyAdd, kEpilogueStages>::GemmKernel>;
  using Gemm = cutlass::gemm::device::GemmUniversalBase<Kernel>;

  static bool run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                  const at::Tensor& found_inf, const at::Tensor& out) {
    if (!body_loaded_for<Kernel>(a.get_device())) return false;
    const int M = static_cast<int>(a.size(0)), K = static_cast<int>(a.size(1)), N = static_cast<int>(b.size(1));
    const int64_t ldd = out.stride(0);

    // EVT arguments: {children..., node}, innermost first.
    typename EVT::Arguments callbacks{
        {
            {
                {{1.0f}, {inv_scale.const_data_ptr<float>()}, {}},  // VisitorScalarBroadcast: *inv_scale
                {},                                                 // VisitorAccFetch
                {}                                                  // multiplies
            },
            {reinterpret_cast<ElementD*>(out.data_ptr()), {ldd, _1{}, int64_t{0}}}  // VisitorAuxStore
        },
        {found_inf.data_ptr<float>()}  // VisitorFlagNonFinite
    };
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K}, /*batch_count=*/1, callbacks,
                                  a.const_data_ptr(), b.const_data_ptr(), /*ptr_C=*/nullptr, /*ptr_D=*/nullptr,
                                  /*batch strides A, B, C, D=*/0, 0, 0, 0,
                                  /*lda=*/a.stride(1), /*ldb=*/b.stride(0), /*ldc=*/0, /*ldd=*/ldd);

    // can_implement checks the problem against the access widths and the launch
    // limits (grid, shared memory); anything it declines takes the unfused route.
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return false;
    const size_t ws_bytes = Gemm::get_workspace_size(args);
    at::Tensor workspace;
    if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, a.options().dtype(at::kByte));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    Gemm gemm;
    if (gemm.initialize(args, ws_bytes > 0 ? workspace.data_ptr() : nullptr, stream) != cutlass::Status::kSuccess) {
      return false;
    }
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess,
                "matmul_unscale_check: CUTLASS sm80 kernel launch failed");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
};

// 128x256x32 tiles (8 warps of 64x64, 3 stages: 72 KiB of shared memory, which
// also fits the 99 KiB of sm_86/89) once the output has at least one full wave
// of them on the GPU; 128x128x32 tiles (4 warps, 4 stages, 64 KiB: two CTAs per
// A100 SM) below that, where more, smaller tiles keep every SM busy.
inline bool pick_large_tile(int64_t M, int64_t N, int sm_count) {
  return (M / 128) * (N / 256) >= sm_count;
}

template <class ElementAB, class ElementD>
bool dispatch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale, const at::Tensor& found_inf,
              const at::Tensor& out) {
  using cutlass::gemm::GemmShape;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (pick_large_tile(a.size(0), b.size(1), sms)) {
    return FusedWgradGemm<ElementAB, ElementD, GemmShape<128, 256, 32>, GemmShape<64, 64, 32>, 3>::run(
        a, b, inv_scale, found_inf, out);
  }
  return FusedWgradGemm<ElementAB, ElementD, GemmShape<128, 128, 32>, GemmShape<64, 64, 32>, 4>::run(
      a, b, inv_scale, found_inf, out);
}

template <class ElementAB>
bool dispatch_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                  const at::Tensor& found_inf, const at::Tensor& out) {
  if (out.scalar_type() == at::kFloat) return dispatch<ElementAB, float>(a, b, inv_scale, found_inf, out);
  return dispatch<ElementAB, ElementAB>(a, b, inv_scale, found_inf, out);
}

}  // namespace sm80

bool matmul_unscale_check_sm80_has_code_for(int device) {
  const int count = at::cuda::device_count();
  TORCH_CHECK(device >= 0 && device < count, "device must be a CUDA device index in [0, ", count, "), got ", device);
  using Probe = sm80::FusedWgradGemm<cutlass::half_t, float, cutlass::gemm::GemmShape<128, 128, 32>,
                                     cutlass::gemm::GemmShape<64, 64, 32>, 4>;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return sm80::body_loaded_for<Probe::Kernel>(device);
}

bool matmul_unscale_check_sm80(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,
                               const at::Tensor& found_inf, const at::Tensor& out) {
  // The instantiated layouts: column-major a, row-major b, row-major out.
  const bool layouts = a.stride(0) == 1 && b.stride(1) == 1 && out.stride(1) == 1 &&
                       (out.scalar_type() == at::kFloat || out.scalar_type() == a.scalar_type());
  // Leading dimensions must be real (not expanded, stride 0) and every access
  // 16 bytes: 8 fp16/bf16 elements of a and b, 16 bytes of out.
  const int64_t out_align = 16 / static_cast<int64_t>(out.element_size());
  const bool strides = a.stride(1) >= a.size(0) && b.stride(0) >= b.size(1) && a.stride(1) > 0 && b.stride(0) > 0 &&
                       a.stride(1) % 8 == 0 && b.stride(0) % 8 == 0 && out.stride(0) % out_align == 0;
  const bool sizes = a.size(0) % 8 == 0 && b.size(1) % 8 == 0 && out.size(1) % out_align == 0 &&
                     a.size(0) <= INT32_MAX && a.size(1) <= INT32_MAX && b.size(1) <= INT32_MAX;
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  if (!layouts || !strides || !sizes || !aligned(a) || !aligned(b) || !aligned(out)) return false;
  switch (a.scalar_type()) {
    case at::kHalf: return sm80::dispatch_out<cutlass::half_t>(a, b, inv_scale, found_inf, out);
    case at::kBFloat16: return sm80::dispatch_out<cutlass::bfloat16_t>(a, b, inv_scale, found_inf, out);
    default: return false;
  }
}

}  // namespace ops
}  // namespace deepseek_ext
