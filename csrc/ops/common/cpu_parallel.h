#pragma once
// at::parallel_for for bodies that call ATen operators.
//
// at::parallel_for runs its body on OpenMP worker threads, which do not carry
// the caller's thread-local state: the dispatch keys excluded below autograd,
// inference mode, grad mode. An operator called there from inside our kernel
// would see the autograd key again ("out=... arguments don't support automatic
// differentiation") or treat inference tensors as normal ones. This wrapper
// gives every worker the caller's state. Bodies of raw loops over pointers do
// not need it.

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace deepseek_ext {
namespace ops {

template <typename F>
void parallel_for_with_caller_state(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

}  // namespace ops
}  // namespace deepseek_ext
