#pragma once
// Fresh CPU outputs that a kernel writes in full, backed by transparent huge
// pages where the kernel allows it.
//
// A fresh at::empty of hundreds of MiB is untouched memory: the kernel writing
// it takes one page fault per 4 KiB page, and those faults can cost more than
// the writes themselves.
// Linux in its default THP mode ("madvise") backs a range with 2 MiB pages
// only when asked. torch asks
// for every large allocation when THP_MEM_ALLOC_ENABLE=1 is set; these ops ask
// for their own large outputs, so a user gets the faster op without changing
// how the rest of the process allocates. Only the 2 MiB-aligned interior of
// the allocation is advised (torch aligns CPU allocations to 64 bytes), before
// anything touches it. The advice changes no value: it is skipped when
// madvise is unavailable or fails.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace deepseek_ext {
namespace ops {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;
// Below this an output is not worth a system call (and holds at most a few huge pages).
constexpr int64_t kHugePageMinBytes = int64_t{16} << 20;

inline void advise_huge_pages(void* data, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes < kHugePageMinBytes) return;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHugePageBytes - 1) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t hi = (begin + static_cast<uintptr_t>(nbytes)) &
                       ~static_cast<uintptr_t>(kHugePageBytes - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

// at::empty(sizes, options) on the CPU, with huge pages asked for when large.
inline at::Tensor empty_for_write(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t.data_ptr(), static_cast<int64_t>(t.nbytes()));
  return t;
}

}  // namespace ops
}  // namespace deepseek_ext
