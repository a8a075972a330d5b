// The Python extension module deepseek_ext._C. Importing it loads the shared
// library, whose static initialisers register every operator with the PyTorch
// dispatcher; the ops are then reached as torch.ops.deepseek_ext.*.
// This file is the only Python-specific source: the C++ library built by
// CMake is the same list of sources without it.

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#ifndef DSX_WITH_CUDA
#define DSX_WITH_CUDA 0
#endif
#ifndef DSX_WITH_CUTLASS_SM90
#define DSX_WITH_CUTLASS_SM90 0
#endif
#ifndef DSX_WITH_CUTLASS_SM80
#define DSX_WITH_CUTLASS_SM80 0
#endif

namespace deepseek_ext {
namespace ops {
int64_t matmul_unscale_check_cpu_checks_from_inputs();  // matmul_unscale_check/cpu/
bool native_bf16_gemm();                                 // matmul_unscale_check/cpu/
bool native_fp16_gemm();                                 // matmul_unscale_check/cpu/
}  // namespace ops
}  // namespace deepseek_ext

#if DSX_WITH_CUDA
namespace deepseek_ext {
namespace ops {
int64_t matmul_unscale_check_fused_sm90_calls();  // kernels/matmul_unscale_check.cu
int64_t matmul_unscale_check_fused_sm80_calls();  // kernels/matmul_unscale_check.cu
#if DSX_WITH_CUTLASS_SM80
bool matmul_unscale_check_sm80_has_code_for(int device);  // kernels/matmul_unscale_check_sm80.cu
#endif
}  // namespace ops
}  // namespace deepseek_ext
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepseek_ext compiled operators (registered as torch.ops.deepseek_ext.*)";
  m.attr("with_cuda") = static_cast<bool>(DSX_WITH_CUDA);
  m.attr("with_cutlass_sm90") = static_cast<bool>(DSX_WITH_CUTLASS_SM90);
  m.def("matmul_unscale_check_fused_sm90_calls", [] {
#if DSX_WITH_CUDA
    return deepseek_ext::ops::matmul_unscale_check_fused_sm90_calls();
#else
    return int64_t{0};
#endif
  }, "How many matmul_unscale_check calls took the fused sm90 CUTLASS kernel in this process.");
  m.def("matmul_unscale_check_cpu_checks_from_inputs", &deepseek_ext::ops::matmul_unscale_check_cpu_checks_from_inputs,
        "How many CPU matmul_unscale_check calls in this process decided found_inf from the inputs "
        "(float32 output, a and b smaller than it, no overflow possible) instead of reading the output.");
  m.def("parallel_for_threads", [](int64_t n) {
    // How many distinct threads at::parallel_for uses here over n unit items:
    // 1 if this library was built without OpenMP (ATen's parallel_for is inline).
    std::vector<std::atomic<int>> seen(std::max(1, at::get_num_threads()));
    at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()].store(1); });
    int count = 0;
    for (auto& s : seen) count += s.load();
    return count;
  }, "Threads at::parallel_for uses from this library's code for n unit items (a build check).");
  m.def("cpu_native_bf16_gemm", &deepseek_ext::ops::native_bf16_gemm,
        "Whether CPU matmul_unscale_check multiplies bfloat16 inputs natively (oneDNN's brgemm on "
        "AMX-BF16, and DEEPSEEK_EXT_CPU_BF16_GEMM is not 0) instead of through float32 copies.");
  m.def("cpu_native_fp16_gemm", &deepseek_ext::ops::native_fp16_gemm,
        "Whether CPU matmul_unscale_check multiplies float16 inputs into a float16 output with torch's "
        "float16 GEMM (oneDNN on AVX512-FP16, and DEEPSEEK_EXT_CPU_FP16_GEMM is not 0) "
        "instead of through float32 copies.");
  m.attr("with_cutlass_sm80") = static_cast<bool>(DSX_WITH_CUTLASS_SM80);
  m.def("matmul_unscale_check_fused_sm80_calls", [] {
#if DSX_WITH_CUDA
    return deepseek_ext::ops::matmul_unscale_check_fused_sm80_calls();
#else
    return int64_t{0};
#endif
  }, "How many matmul_unscale_check calls took the fused sm80 CUTLASS kernel in this process.");
  m.def("matmul_unscale_check_sm80_has_code_for", [](int device) {
#if DSX_WITH_CUTLASS_SM80
    return deepseek_ext::ops::matmul_unscale_check_sm80_has_code_for(device);
#else
    (void)device;
    return false;
#endif
  }, "Whether the image the CUDA runtime loads for this device index holds the fused sm80 kernel "
     "(an 8.x build target: sm_8x GPUs, or newer ones through the JIT of an 8.0+PTX build).");
}
