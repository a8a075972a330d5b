#pragma once
// Internal helpers of the shared_attention op (csrc/ops/shared_attention/shared_attention.cpp).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace deepseek_ext {
namespace ops {

// Throws a c10::Error naming the offending argument unless:
//   x [B, T, d_model] floating; n_heads, n_kv_heads > 0, n_heads % n_kv_heads == 0,
//   d_model % n_heads == 0 (head_dim = d_model / n_heads);
//   w_qkv [(n_heads + 2 n_kv_heads) head_dim, d_model], b_qkv [(n_heads + 2 n_kv_heads) head_dim];
//   w_out [d_model, d_model], b_out [d_model]; key_padding_mask bool [B, T];
//   dropout_p in [0, 1]; every tensor on x's device.
// Works on symbolic sizes (torch.compile traces the op's decomposition).
void check_shared_attention_inputs(const at::Tensor& x, const at::Tensor& w_qkv,
                                   const std::optional<at::Tensor>& b_qkv, const at::Tensor& w_out,
                                   const std::optional<at::Tensor>& b_out, int64_t n_heads,
                                   int64_t n_kv_heads,
                                   const std::optional<at::Tensor>& key_padding_mask,
                                   double dropout_p);

}  // namespace ops
}  // namespace deepseek_ext
