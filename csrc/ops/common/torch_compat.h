// The one place where the library copes with differences between the torch
// versions it builds against (pyproject.toml's range). Each entry is chosen by
// what the installed headers provide (__has_include), not by version numbers,
// so a torch that gains a public op is used without an edit here.
// Tested by tests/python/test_build.py, which compiles this header against the
// installed torch.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#if __has_include(<ATen/ops/grouped_mm.h>)
#include <ATen/ops/grouped_mm.h>
#define DSX_HAS_PUBLIC_GROUPED_MM 1
#else
#include <ATen/ops/_grouped_mm.h>
#define DSX_HAS_PUBLIC_GROUPED_MM 0
#endif

namespace deepseek_ext {
namespace compat {

// True when torch's C++ API has a public grouped GEMM (at::grouped_mm).
inline constexpr bool kHasPublicGroupedMm = DSX_HAS_PUBLIC_GROUPED_MM;

// Grouped GEMM: `a` [M, K] x `b` [G, K, N] with `offs` the int32 cumulative
// row ends of the G groups (or the 2-D x 2-D and 3-D forms of
// torch.nn.functional.grouped_mm). Python exposes this as
// torch.nn.functional.grouped_mm; C++ has only the private at::_grouped_mm up
// to the newest torch we build against, which is used until at::grouped_mm
// exists.
inline at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b,
                             const std::optional<at::Tensor>& offs) {
#if DSX_HAS_PUBLIC_GROUPED_MM
  return at::grouped_mm(a, b, offs);
#else
  return at::_grouped_mm(a, b, offs);
#endif
}

}  // namespace compat
}  // namespace deepseek_ext
