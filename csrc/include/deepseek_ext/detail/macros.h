#pragma once
// Annotations shared by the CPU and CUDA builds of the same inline math.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DSX_HOST_DEVICE __host__ __device__
#else
#define DSX_HOST_DEVICE
#endif

#define DSX_INLINE DSX_HOST_DEVICE inline
