#pragma once
// Input checks shared by the operators' entry points: each message names the
// argument, what was expected and what came.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace deepseek_ext {
namespace ops {

inline void check_tensor(const at::Tensor& t, const char* name, c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, name, " must be a strided (dense) tensor, got ",
              t.layout());
  TORCH_CHECK(t.device().type() == device_type, name, " must be a ", device_type,
              " tensor, got a tensor on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

}  // namespace ops
}  // namespace deepseek_ext
