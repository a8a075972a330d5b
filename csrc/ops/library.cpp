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

  // out = (a @ b) * inv_scale with float32 accumulation, converted to out_dtype
  // (float32, or a's dtype when None); found_inf = 1.0 if any converted output
  // element is inf/NaN (never cleared). a, b: float16/bfloat16 (float32 too).
  // The weight-gradient GEMM of mixed-precision training, with the loss-scale
  // overflow check fused in.
  m.def("matmul_unscale_check(Tensor a, Tensor b, Tensor inv_scale, Tensor(a!) found_inf, *, "
        "ScalarType? out_dtype=None) -> Tensor");

  // One step of the dynamic loss-scale state machine (detail/loss_scale.h),
  // entirely on the device: scale (float32[1]), growth_tracker (int32[1]),
  // hysteresis_tracker (int32[1]) and skip_counts (int64[2]: consecutive,
  // total skipped steps) are updated from found_inf (float32[1]).
  m.def("update_scale_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor(c!) hysteresis_tracker, "
        "Tensor(d!) skip_counts, Tensor found_inf, float growth_factor, float backoff_factor, "
        "int growth_interval, int hysteresis, float min_scale, float max_scale) -> ()");
  // 8-bit gradient quantisation (blockwise int8, scale = absmax / 127 per
  // block of the flattened tensor; see deepseek_ext/ops.h).
  // q: int8 with x's shape; scales: float32 [ceil(numel / block_size)].
  m.def("quantize_int8(Tensor x, int block_size=256, bool stochastic=False, int seed=0, "
        "int offset=0) -> (Tensor q, Tensor scales)");
  // Quantises x + residual and writes residual = (x + residual) - dequant(q).
  m.def("quantize_int8_ef_(Tensor x, Tensor(a!) residual, int block_size=256, "
        "bool stochastic=False, int seed=0, int offset=0) -> (Tensor q, Tensor scales)");
  // q * scale in dtype, with q's shape (q has numel elements).
  m.def("dequantize_int8(Tensor q, Tensor scales, int block_size, ScalarType dtype, int numel) "
        "-> Tensor");
  // multiplier * sum_w dequant(q[w]) for q [W, n], scales [W, nblocks] -> [n].
  m.def("dequantize_reduce_int8(Tensor q, Tensor scales, int block_size, float multiplier, "
        "ScalarType dtype) -> Tensor");

  // ---- gated sparse FFN (see deepseek_ext/ops.h for the layout) ----
  // Top-k blocks of scores + bias per token (bias only steers the choice), and
  // the (token, block) pairs p = t * k + j grouped by block: topk_idx int64
  // [T, k], order int64 [T * k] (pairs sorted by block, stable), offsets int64
  // [n_blocks + 1] (block b owns order[offsets[b] : offsets[b + 1]]).
  m.def("sparse_ffn_route(Tensor scores, Tensor bias, int k) "
        "-> (Tensor topk_idx, Tensor order, Tensor offsets)");
  // out[t] = sum_j gate[t, j] * act(x[t] @ w1_b^T + b1_b) @ w2_b over token t's
  // selected blocks b only; hidden = the pre-activations of the pairs in
  // `order` order [T * k, m * block_size] (saved for the backward).
  m.def("sparse_ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor gate, Tensor order, "
        "Tensor offsets, int block_size, str activation) -> (Tensor out, Tensor hidden)");
  // The gradients of sparse_ffn with the same sparsity.
  // Its building blocks (not differentiable): rows of x [T, d_model] in block
  // order, out[i] = x[order[i] // k] -> [T * k, d_model]; and back to token
  // order, out[t] = sum_j gate[t, j] * y[i] over the rows i with order[i] =
  // t * k + j (gate 1 when None), float32 accumulation -> [T, d_model].
  m.def("sparse_ffn_gather(Tensor x, Tensor order, int k) -> Tensor");
  m.def("sparse_ffn_combine(Tensor y, Tensor order, int k, Tensor? gate=None) -> Tensor");
  m.def("sparse_ffn_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor gate, "
        "Tensor hidden, Tensor order, Tensor offsets, int block_size, str activation) "
        "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_gate)");
  // Multi-head attention with a fused QKV projection (shared-attention layers):
  // x [B, T, d_model] -> linear(x, w_qkv, b_qkv) split into n_heads query and
  // n_kv_heads key/value heads (grouped-query when fewer) -> SDPA (causal
  // and/or key_padding_mask [B, T] bool, True = padding; dropout_p when
  // training) -> linear(., w_out, b_out) -> [B, T, d_model]. A composition of
  // ATen ops (CompositeImplicitAutograd, csrc/ops/shared_attention/).
  m.def("shared_attention(Tensor x, Tensor w_qkv, Tensor? b_qkv, Tensor w_out, Tensor? b_out, "
        "int n_heads, int n_kv_heads, bool causal=False, Tensor? key_padding_mask=None, "
        "float dropout_p=0.0, bool training=False) -> Tensor");
}
