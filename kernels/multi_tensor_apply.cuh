#pragma once
// Multi-tensor launches over lists of tensors of mixed dtypes.
//
// The pattern of apex's multi_tensor_apply, reshaped so that one launch can
// cover a long list with enough blocks to fill a large GPU: every tensor is
// cut into chunks of `chunk_elems` elements, each block owns one chunk, and the
// kernel finds its tensor by a binary search over the prefix sums of chunk
// counts that travel in the kernel's parameter space (no device metadata, no
// host-device copy). A list with more than kMaxTensorsPerLaunch tensors takes
// one launch per group of kMaxTensorsPerLaunch.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace deepseek_ext {
namespace cuda {

enum class ElemType : uint8_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

inline ElemType elem_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ElemType::kFloat;
    case at::kHalf: return ElemType::kHalf;
    case at::kBFloat16: return ElemType::kBFloat16;
    default: TORCH_INTERNAL_ASSERT(false, "multi_tensor_apply: unsupported dtype ", t);
  }
  return ElemType::kFloat;
}

// Kept under the classic 4 KiB kernel-parameter limit (3.4 KiB).
constexpr int kMaxTensorsPerLaunch = 160;

struct MixedTensorList {
  void* data[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  // chunk_begin[t] = first chunk (block) of tensor t; chunk_begin[n] = total.
  int32_t chunk_begin[kMaxTensorsPerLaunch + 1];
  ElemType dtype[kMaxTensorsPerLaunch];
  int32_t num_tensors;
};
static_assert(sizeof(MixedTensorList) <= 4096, "kernel parameter space");

// Index of the tensor that owns `chunk`: the last t with chunk_begin[t] <= chunk.
__device__ __forceinline__ int tensor_of_chunk(const MixedTensorList& list, int32_t chunk) {
  int lo = 0;
  int hi = list.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (list.chunk_begin[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Calls launch(list, num_chunks) once per group of tensors. `tensors` holds
// flat (dense, non-overlapping) tensors; undefined or empty ones are skipped.
template <typename Launch>
void multi_tensor_apply(const std::vector<at::Tensor>& tensors, int64_t chunk_elems,
                        Launch&& launch) {
  MixedTensorList list;
  list.num_tensors = 0;
  int64_t chunks = 0;
  auto flush = [&] {
    if (list.num_tensors == 0) return;
    list.chunk_begin[list.num_tensors] = static_cast<int32_t>(chunks);
    launch(list, static_cast<int32_t>(chunks));
    list.num_tensors = 0;
    chunks = 0;
  };
  for (const at::Tensor& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    const int64_t n = t.numel();
    const int64_t c = (n + chunk_elems - 1) / chunk_elems;
    TORCH_CHECK(c < (int64_t{1} << 30), "multi_tensor_apply: tensor of ", n,
                " elements is too large");
    if (list.num_tensors == kMaxTensorsPerLaunch || chunks + c >= (int64_t{1} << 31) - 1) flush();
    const int i = list.num_tensors++;
    list.data[i] = t.data_ptr();
    list.numel[i] = n;
    list.chunk_begin[i] = static_cast<int32_t>(chunks);
    list.dtype[i] = elem_type_of(t.scalar_type());
    chunks += c;
  }
  flush();
}

}  // namespace cuda
}  // namespace deepseek_ext
