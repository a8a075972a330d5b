// Multi-head attention with a fused QKV projection, as one op whose body is a
// composition of ATen ops (linear, views, scaled_dot_product_attention,
// linear). It is registered for CompositeImplicitAutograd: autograd, Meta,
// CPU and CUDA all come from those ATen ops, torch.compile traces through it,
// and SDPA picks the flash / cuDNN / memory-efficient backend on the GPU.
// The C++ module deepseek_ext::nn::SharedAttention and the Python module
// deepseek_ext.nn.SharedAttention both call this op, so the math lives here only.

#include "shared_attention/shared_attention.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "deepseek_ext/ops.h"

namespace deepseek_ext {

at::Tensor shared_attention(const at::Tensor& x, const at::Tensor& w_qkv,
                            const std::optional<at::Tensor>& b_qkv, const at::Tensor& w_out,
                            const std::optional<at::Tensor>& b_out, int64_t n_heads,
                            int64_t n_kv_heads, bool causal,
                            const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                            bool training) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepseek_ext::shared_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, int64_t, int64_t, bool,
                                         const std::optional<at::Tensor>&, double, bool)>();
  return op.call(x, w_qkv, b_qkv, w_out, b_out, n_heads, n_kv_heads, causal, key_padding_mask,
                 dropout_p, training);
}

namespace ops {

namespace {

void check_on_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on the same device as x (", x.device(),
              "), got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, c10::SymIntArrayRef expected) {
  TORCH_CHECK(t.sym_sizes() == expected, name, " must have shape ", expected, ", got ",
              t.sym_sizes());
}

}  // namespace

void check_shared_attention_inputs(const at::Tensor& x, const at::Tensor& w_qkv,
                                   const std::optional<at::Tensor>& b_qkv, const at::Tensor& w_out,
                                   const std::optional<at::Tensor>& b_out, int64_t n_heads,
                                   int64_t n_kv_heads,
                                   const std::optional<at::Tensor>& key_padding_mask,
                                   double dropout_p) {
  TORCH_CHECK(x.dim() == 3, "x must be a 3-D tensor [batch, seq, d_model], got ", x.dim(),
              " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(n_heads > 0, "n_heads must be positive, got ", n_heads);
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0,
              "n_kv_heads must be positive and divide n_heads (", n_heads, "), got ", n_kv_heads);
  const c10::SymInt d_model = x.sym_size(2);
  TORCH_CHECK(d_model % n_heads == 0, "x.size(-1) (d_model = ", d_model,
              ") must be divisible by n_heads (", n_heads, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p must be in [0, 1], got ",
              dropout_p);
  const c10::SymInt qkv_dim = (d_model / n_heads) * (n_heads + 2 * n_kv_heads);
  check_shape(w_qkv, "w_qkv", {qkv_dim, d_model});
  check_on_device(w_qkv, "w_qkv", x);
  if (b_qkv.has_value()) {
    check_shape(*b_qkv, "b_qkv", {qkv_dim});
    check_on_device(*b_qkv, "b_qkv", x);
  }
  check_shape(w_out, "w_out", {d_model, d_model});
  check_on_device(w_out, "w_out", x);
  if (b_out.has_value()) {
    check_shape(*b_out, "b_out", {d_model});
    check_on_device(*b_out, "b_out", x);
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool,
                "key_padding_mask must be a bool tensor (True = padding), got ",
                mask.scalar_type());
    check_shape(mask, "key_padding_mask", {x.sym_size(0), x.sym_size(1)});
    check_on_device(mask, "key_padding_mask", x);
  }
}

namespace {

// The decomposition. x [B, T, D] -> qkv [B, T, (H + 2 Hkv) hd] -> heads
// [B, H + 2 Hkv, T, hd] (views) -> SDPA (grouped-query when Hkv < H) ->
// [B, T, D] -> output projection.
at::Tensor shared_attention_composite(const at::Tensor& x, const at::Tensor& w_qkv,
                                      const std::optional<at::Tensor>& b_qkv,
                                      const at::Tensor& w_out,
                                      const std::optional<at::Tensor>& b_out, int64_t n_heads,
                                      int64_t n_kv_heads, bool causal,
                                      const std::optional<at::Tensor>& key_padding_mask,
                                      double dropout_p, bool training) {
  check_shared_attention_inputs(x, w_qkv, b_qkv, w_out, b_out, n_heads, n_kv_heads,
                                key_padding_mask, dropout_p);
  const c10::SymInt batch = x.sym_size(0);
  const c10::SymInt seq = x.sym_size(1);
  const c10::SymInt d_model = x.sym_size(2);
  const c10::SymInt head_dim = d_model / n_heads;

  const at::Tensor heads = at::linear(x, w_qkv, b_qkv)
                               .view_symint({batch, seq, n_heads + 2 * n_kv_heads, head_dim})
                               .transpose(1, 2);
  const at::Tensor q = heads.narrow(1, 0, n_heads);
  const at::Tensor k = heads.narrow(1, n_heads, n_kv_heads);
  const at::Tensor v = heads.narrow(1, n_heads + n_kv_heads, n_kv_heads);

  // SDPA takes either is_causal or a mask: with padding, the causal triangle
  // goes into the boolean mask (True = may attend). A query with no key left
  // to attend to gets zeros from SDPA.
  std::optional<at::Tensor> attn_mask;
  bool is_causal = causal;
  if (key_padding_mask.has_value()) {
    at::Tensor keep = key_padding_mask->logical_not().view_symint({batch, 1, 1, seq});
    if (causal) {
      keep = keep.logical_and(at::ones_symint({seq, seq}, x.options().dtype(at::kBool)).tril());
      is_causal = false;
    }
    attn_mask = keep;
  }
  const at::Tensor attn =
      at::scaled_dot_product_attention(q, k, v, attn_mask, training ? dropout_p : 0.0, is_causal,
                                       std::nullopt, /*enable_gqa=*/n_kv_heads != n_heads);
  return at::linear(attn.transpose(1, 2).reshape_symint({batch, seq, d_model}), w_out, b_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(deepseek_ext, CompositeImplicitAutograd, m) {
  m.impl("shared_attention", &shared_attention_composite);
}

}  // namespace ops
}  // namespace deepseek_ext
