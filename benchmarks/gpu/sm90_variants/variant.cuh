// One configuration of the fused sm90 GEMM (kernels/matmul_unscale_check_sm90.cuh)
// as a function for bench_gemm_sm90_variants.py: float16 and bfloat16 operands,
// the library's layouts (a column-major, b row-major, float32 row-major out).
// Returns false when CUTLASS declines the shape.
#pragma once

#include "matmul_unscale_check_sm90.cuh"

#define DSX_SM90_VARIANT(NAME, TILE, CLUSTER, KERNEL_SCHEDULE, EPILOGUE_SCHEDULE, TILE_SCHEDULER)         \
  bool NAME(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_scale,                        \
            const at::Tensor& found_inf, const at::Tensor& out) {                                         \
    using deepseek_ext::ops::sm90::FusedWgradGemm;                                                         \
    switch (a.scalar_type()) {                                                                             \
      case at::kHalf:                                                                                      \
        return FusedWgradGemm<cutlass::half_t, TILE, CLUSTER, KERNEL_SCHEDULE, EPILOGUE_SCHEDULE,          \
                              TILE_SCHEDULER>::run(a, b, inv_scale, found_inf, out);                       \
      case at::kBFloat16:                                                                                  \
        return FusedWgradGemm<cutlass::bfloat16_t, TILE, CLUSTER, KERNEL_SCHEDULE, EPILOGUE_SCHEDULE,      \
                              TILE_SCHEDULER>::run(a, b, inv_scale, found_inf, out);                       \
      default:                                                                                             \
        return false;                                                                                      \
    }                                                                                                      \
  }
