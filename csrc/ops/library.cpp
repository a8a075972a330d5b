// Every deepseek_ext operator schema, in one place. Kernels for each dispatch
// key are registered next to their implementations (cpu/*.cpp, kernels/*.cu);
// fake (meta) kernels live next to the Python wrappers in deepseek_ext/ops.py.
//
// Conventions: mutated arguments carry an alias annotation `(a!)`, in-place ops
// end in `_`, and ops that only mutate return `()`.

#include <torch/library.h>

TORCH_LIBRARY(deepseek_ext, m) {
  // grads[i] *= inv_scale for all i; found_inf = 1.0 if any grads element was
  // inf/NaN. Drop-in for aten::_amp_foreach_non_finite_check_and_unscale_,
  // with float32, float16 and bfloat16 gradients mixed in one list.
  m.def("unscale_and_check_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale) -> ()");
}
