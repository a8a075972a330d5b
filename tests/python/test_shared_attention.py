"""Tests of the shared_attention op and the shared-attention modules."""

import copy
import gc
import io
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import deepseek_ext
from deepseek_ext.nn import (
    SharedAttention,
    SharedAttentionConfig,
    SharedAttentionTransformer,
    parameter_formula,
    parameter_report,
    sharing_plan,
)
from deepseek_ext.nn.shared_attention import SHARING_PLANS

from utils import DEVICES, run_ranks, sgd_logsumexp_steps

OP = torch.ops.deepseek_ext.shared_attention.default


# ---- the op ----

def reference_attention(x, w_qkv, b_qkv, w_out, b_out, n_heads, n_kv_heads, causal, key_padding_mask):
    """Plain PyTorch: explicit softmax(QK^T / sqrt(hd) + mask) V, KV heads repeated."""
    b, t, d = x.shape
    hd = d // n_heads
    qkv = F.linear(x, w_qkv, b_qkv).view(b, t, n_heads + 2 * n_kv_heads, hd).transpose(1, 2)
    q, k, v = qkv.split([n_heads, n_kv_heads, n_kv_heads], dim=1)
    rep = n_heads // n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / hd ** 0.5
    keep = torch.ones(b, 1, t, t, dtype=torch.bool, device=x.device)
    if causal:
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = (probs @ v).transpose(1, 2).reshape(b, t, d)
    return F.linear(out, w_out, b_out)


def sample_inputs(device, requires_grad=False, dtype=torch.float32):
    """(args, kwargs-free) tuples covering MHA/GQA, bias/no bias, causal, padding."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)

    samples = []
    for (b, s, d, h, hkv, bias, causal, pad) in [
        (2, 5, 16, 4, 4, True, False, False),
        (2, 6, 16, 4, 2, True, True, False),
        (3, 4, 12, 3, 1, False, False, True),
        (2, 7, 16, 2, 2, True, True, True),
    ]:
        qkv = (h + 2 * hkv) * (d // h)
        mask = None
        if pad:
            mask = torch.zeros(b, s, dtype=torch.bool)
            mask[0, -2:] = True
            mask[-1, -1:] = True
            mask = mask.to(device)
        samples.append((t(b, s, d), t(qkv, d), t(qkv) if bias else None, t(d, d), t(d) if bias else None,
                        h, hkv, causal, mask, 0.0, False))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_op_matches_reference(device):
    for args in sample_inputs(device, dtype=torch.float64):
        out = OP(*args)
        ref = reference_attention(*args[:9])
        torch.testing.assert_close(out, ref)


def test_op_gradcheck():
    for args in sample_inputs("cpu", requires_grad=True, dtype=torch.float64)[1:]:
        tensors = [a for a in args[:5] if a is not None]

        def fn(*ts, args=args):
            it = iter(ts)
            return OP(*[None if a is None else next(it) for a in args[:5]], *args[5:])

        assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # GQA + causal, and padding without biases: between them every branch of the op.
    for args in sample_inputs(device, requires_grad=True)[1:3]:
        torch.library.opcheck(OP, args)


def test_op_compile_fullgraph():
    args = sample_inputs("cpu")[3]
    fn = torch.compile(lambda *a: deepseek_ext.ops.shared_attention(
        *a[:5], a[5], a[6], causal=a[7], key_padding_mask=a[8]), fullgraph=True)
    torch.testing.assert_close(fn(*args), OP(*args), atol=1e-5, rtol=1e-5)


def test_op_dropout_only_in_training():
    x, w, b, wo, bo = sample_inputs("cpu")[0][:5]
    eval_out = OP(x, w, b, wo, bo, 4, 4, False, None, 0.5, False)
    torch.testing.assert_close(eval_out, OP(x, w, b, wo, bo, 4, 4, False, None, 0.0, False))
    torch.manual_seed(0)
    train_out = OP(x, w, b, wo, bo, 4, 4, False, None, 0.5, True)
    assert not torch.allclose(train_out, eval_out)


def test_op_bad_inputs():
    x, w, b, wo, bo = sample_inputs("cpu")[0][:5]
    with pytest.raises(RuntimeError, match="x must be a 3-D tensor"):
        OP(x[0], w, b, wo, bo, 4, 4, False, None, 0.0, False)
    with pytest.raises(RuntimeError, match="n_kv_heads must be positive and divide n_heads"):
        OP(x, w, b, wo, bo, 4, 3, False, None, 0.0, False)
    with pytest.raises(RuntimeError, match="divisible by n_heads"):
        OP(x, w, b, wo, bo, 3, 3, False, None, 0.0, False)
    with pytest.raises(RuntimeError, match="w_qkv must have shape"):
        OP(x, w[:-1], b, wo, bo, 4, 4, False, None, 0.0, False)
    with pytest.raises(RuntimeError, match="b_qkv must have shape"):
        OP(x, w, b[:-1], wo, bo, 4, 4, False, None, 0.0, False)
    with pytest.raises(RuntimeError, match="w_out must have shape"):
        OP(x, w, b, wo[:, :-1], bo, 4, 4, False, None, 0.0, False)
    with pytest.raises(RuntimeError, match="key_padding_mask must be a bool tensor"):
        OP(x, w, b, wo, bo, 4, 4, False, torch.zeros(2, 5), 0.0, False)
    with pytest.raises(RuntimeError, match="key_padding_mask must have shape"):
        OP(x, w, b, wo, bo, 4, 4, False, torch.zeros(2, 4, dtype=torch.bool), 0.0, False)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        OP(x, w, b, wo, bo, 4, 4, False, None, 1.5, True)


# ---- SharedAttention ----

def test_module_shapes_and_masks():
    torch.manual_seed(0)
    attn = SharedAttention(32, 4, n_kv_heads=2)
    assert attn.qkv_weight.shape == (64, 32) and attn.out_weight.shape == (32, 32)
    x = torch.randn(3, 6, 32)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4:] = True
    out = attn(x, causal=True, key_padding_mask=mask)
    assert out.shape == x.shape
    ref = reference_attention(x, attn.qkv_weight, attn.qkv_bias, attn.out_weight, attn.out_bias,
                              4, 2, True, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Padding keys do not influence the other positions.
    x2 = x.clone()
    x2[1, 4:] = 100.0
    torch.testing.assert_close(attn(x2, key_padding_mask=mask)[1, :4], attn(x, key_padding_mask=mask)[1, :4])
    # Causal: a position does not see later ones.
    x3 = x.clone()
    x3[:, -1] = -7.0
    torch.testing.assert_close(attn(x3, causal=True)[:, :-1], attn(x, causal=True)[:, :-1])


def test_module_state_dict_round_trip():
    torch.manual_seed(0)
    a = SharedAttention(16, 4, dropout=0.1)
    b = SharedAttention(16, 4, dropout=0.1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    a.eval(), b.eval()
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"qkv_weight", "qkv_bias", "out_weight", "out_bias"}
    assert set(SharedAttention(16, 4, bias=False).state_dict()) == {"qkv_weight", "out_weight"}


def test_module_jit_script():
    torch.manual_seed(0)
    attn = SharedAttention(16, 4, n_kv_heads=2).eval()
    scripted = torch.jit.script(attn)
    assert "deepseek_ext::shared_attention" in str(scripted.graph)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    torch.testing.assert_close(scripted(x, causal=True, key_padding_mask=mask),
                               attn(x, causal=True, key_padding_mask=mask))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    torch.testing.assert_close(loaded(x), attn(x))


def test_module_bad_options():
    with pytest.raises(ValueError, match="d_model .* must be divisible by n_heads"):
        SharedAttention(30, 4)
    with pytest.raises(ValueError, match="n_kv_heads must divide n_heads"):
        SharedAttention(32, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        SharedAttention(32, 0)
    with pytest.raises(ValueError, match="dropout must be in"):
        SharedAttention(32, 4, dropout=1.0)


# ---- sharing plans and the transformer ----

def test_sharing_plans():
    assert sharing_plan("none", 6) == [0, 1, 2, 3, 4, 5]
    assert sharing_plan("all", 6) == [0] * 6
    assert sharing_plan("sequence", 6, 3) == [0, 0, 1, 1, 2, 2]
    assert sharing_plan("cycle", 6, 3) == [0, 1, 2, 0, 1, 2]
    assert sharing_plan("cycle_reverse", 6, 3) == [0, 1, 2, 2, 1, 0]
    assert sharing_plan("cycle_reverse", 9, 3) == [0, 1, 2, 0, 1, 2, 2, 1, 0]
    assert sharing_plan("sequence", 12, 4) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for plan in SHARING_PLANS:
        for n in (1, 5, 12):
            for m in ([None] if plan in ("none", "all") else [None, 1, min(2, n), n]):
                idx = sharing_plan(plan, n, m)
                assert len(idx) == n and sorted(set(idx)) == list(range(len(set(idx))))


def small(**kw):
    cfg = dict(vocab_size=50, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=16)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("plan,n_unique", [("none", None), ("all", None), ("sequence", 2),
                                           ("cycle", 2), ("cycle_reverse", 3)])
@pytest.mark.parametrize("share_ffn", [False, True])
def test_transformer_plan_maps_layers(plan, n_unique, share_ffn):
    model = SharedAttentionTransformer(**small(sharing=plan, n_unique=n_unique, share_ffn=share_ffn))
    idx = sharing_plan(plan, 4, n_unique)
    assert isinstance(model.layers, torch.nn.ModuleList)
    for i in range(4):
        for j in range(4):
            assert (model.layers[i].attn is model.layers[j].attn) == (idx[i] == idx[j])
            assert (model.layers[i].ffn is model.layers[j].ffn) == (share_ffn and idx[i] == idx[j] or i == j)
            assert (model.layers[i].ln1 is model.layers[j].ln1) == (i == j)
    tokens = torch.randint(0, 50, (2, 7))
    assert model(tokens).shape == (2, 7, 50)


@pytest.mark.parametrize("plan,n_unique", [("none", None), ("all", None), ("sequence", 3),
                                           ("cycle", 2), ("cycle_reverse", 2), ("sequence", 1)])
@pytest.mark.parametrize("extra", [{}, {"share_ffn": True}, {"embed_dim": 8},
                                   {"tie_embeddings": False, "n_kv_heads": 2},
                                   {"embed_dim": 8, "tie_embeddings": False, "share_ffn": True}])
def test_parameter_counts_match_formula(plan, n_unique, extra):
    cfg = small(n_layers=6, sharing=plan, n_unique=n_unique, **extra)
    model = SharedAttentionTransformer(**cfg)
    actual = sum(p.numel() for p in model.parameters())
    formula = parameter_formula(cfg)
    assert actual == formula["total"]
    report = parameter_report(model)
    assert report == parameter_report(cfg)
    assert report["params"] == actual
    unshared = SharedAttentionTransformer(**small(n_layers=6, **{k: v for k, v in extra.items()
                                                                 if k != "embed_dim" and k != "share_ffn"}))
    assert report["params_unshared"] == sum(p.numel() for p in unshared.parameters())
    assert report["adam_state_bytes"] == 2 * 4 * actual
    assert report["training_state_bytes_saved"] == 16 * (report["params_unshared"] - actual)


def test_parameter_report_bert_base():
    bert = dict(vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512)
    assert parameter_report(dict(bert, sharing="none"))["reduction"] == 0.0
    attn_only = parameter_report(dict(bert, sharing="all"))["reduction"]
    factorised = parameter_report(dict(bert, sharing="all", embed_dim=128))["reduction"]
    assert 0.22 < attn_only < 0.26
    assert 0.38 < factorised < 0.44


def test_transformer_shared_grad_is_sum_of_untied_clones():
    torch.manual_seed(0)
    shared = SharedAttentionTransformer(**small(sharing="all", dropout=0.0)).double()
    untied = SharedAttentionTransformer(**small(sharing="none", dropout=0.0)).double()
    untied.load_state_dict(shared.state_dict())  # every layer's attention gets the shared values
    for i in range(1, 4):
        assert untied.layers[i].attn is not untied.layers[0].attn
    tokens = torch.randint(0, 50, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    shared(tokens, mask).sum().backward()
    untied(tokens, mask).sum().backward()
    for name in ("qkv_weight", "qkv_bias", "out_weight", "out_bias"):
        total = sum(getattr(untied.layers[i].attn, name).grad for i in range(4))
        torch.testing.assert_close(getattr(shared.layers[0].attn, name).grad, total, atol=1e-10, rtol=1e-10)
    n_shared = sum(1 for _ in shared.parameters())
    n_untied = sum(1 for _ in untied.parameters())
    assert n_untied - n_shared == 3 * 4  # three extra copies of four tensors


def test_transformer_state_dict_round_trip_keeps_sharing():
    torch.manual_seed(0)
    a = SharedAttentionTransformer(**small(sharing="cycle", n_unique=2, embed_dim=8))
    b = SharedAttentionTransformer(**small(sharing="cycle", n_unique=2, embed_dim=8))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    tokens = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(a(tokens), b(tokens))
    assert b.layers[0].attn is b.layers[2].attn


def test_transformer_jit_script():
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(sharing="all", embed_dim=8)).eval()
    scripted = torch.jit.script(model)
    tokens = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(scripted(tokens), model(tokens))


@pytest.mark.parametrize("embed_dim", [None, 8])
def test_transformer_compile_fullgraph(embed_dim):
    # aot_eager: Dynamo and AOTAutograd trace the whole model, shared weights and the
    # op's decomposition included, without a graph break (Inductor codegen of the op
    # is covered by test_op_compile_fullgraph, and is slow on this machine). With
    # embed_dim, the factorised embedding's autograd.Functions are traced too.
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(n_layers=3, sharing="cycle", n_unique=2, embed_dim=embed_dim))
    tokens = torch.randint(0, 50, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(tokens, mask)
    torch.testing.assert_close(out, model(tokens, mask), atol=1e-4, rtol=1e-4)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(tokens, mask).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_with_shared_weights():
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(sharing="all", share_ffn=True))
    tokens = torch.randint(0, 50, (2, 8))

    def run(use_ckpt):
        model.zero_grad()
        h = model.drop(model.emb_proj(model.tok_emb(tokens) + model.pos_emb(torch.arange(8))))
        for block in model.layers:
            h = checkpoint(block, h, True, None, use_reentrant=False) if use_ckpt else block(h, True, None)
        F.linear(model.ln_f(h), model.tok_emb.weight).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b)


# ---- factorised embedding (embed_dim < d_model) ----

def plain_forward(model, tokens, key_padding_mask=None):
    """The factorised model as a plain composition of modules (what autograd saves
    for it includes the two narrow [B, T, E] activations)."""
    h = model.emb_proj(model.tok_emb(tokens) + model.pos_emb(torch.arange(tokens.shape[1], device=tokens.device)))
    h = model.drop(h)
    for block in model.layers:
        h = block(h, model.causal, key_padding_mask)
    h = model.head_proj(model.ln_f(h))
    return F.linear(h, model.tok_emb.weight) if model.lm_head is None else model.lm_head(h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_factorised_embedding_matches_plain_composition(device, tie_embeddings):
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(sharing="cycle", n_unique=2, embed_dim=8,
                                               tie_embeddings=tie_embeddings)).to(device)
    tokens = torch.randint(0, 50, (3, 7), device=device)
    mask = torch.zeros(3, 7, dtype=torch.bool, device=device)
    mask[1, 5:] = True
    out, ref = model(tokens, mask), plain_forward(model, tokens, mask)
    assert torch.equal(out, ref)  # the same ops in the same order
    w = torch.randn_like(out)
    params = list(model.parameters())
    grads = torch.autograd.grad((out * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_factorised_embedding_under_autocast():
    """bfloat16 autocast (CPU): the linears run in bfloat16 in forward and backward,
    the gradients come back in the parameters' float32, as for the plain composition."""
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(sharing="all", embed_dim=8))
    tokens = torch.randint(0, 50, (3, 7))
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(tokens), plain_forward(model, tokens)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    w = torch.randn(out.shape).to(out.dtype)
    grads = torch.autograd.grad((out * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for (name, p), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert g.dtype == p.dtype == torch.float32, name
        torch.testing.assert_close(g, r, rtol=1.6e-2, atol=1e-3, msg=lambda m: f"{name}: {m}")


def test_factorised_embedding_saves_no_narrow_activations():
    """Autograd keeps two [B, T, E] float32 tensors fewer than for the plain composition."""
    from torch.autograd.graph import saved_tensors_hooks

    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(sharing="all", embed_dim=8))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, 50, (3, 7))

    def saved_bytes(forward):
        total = 0

        def pack(t):
            nonlocal total
            if t.untyped_storage().data_ptr() not in params:  # parameters are not activations
                total += t.numel() * t.element_size()
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            forward(model, tokens)
        return total

    assert saved_bytes(plain_forward) - saved_bytes(SharedAttentionTransformer.forward) == 2 * 3 * 7 * 8 * 4


def test_factorised_embedding_under_activation_checkpointing():
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(sharing="all", embed_dim=8))
    tokens = torch.randint(0, 50, (2, 8))
    model(tokens).square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    checkpoint(model, tokens, use_reentrant=False).square().mean().backward()
    for e, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, e)


def test_ffn_factory_is_called_once_per_unique_ffn():
    calls = []

    def factory(i):
        calls.append(i)
        return torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 32))

    model = SharedAttentionTransformer(**small(sharing="cycle", n_unique=2, share_ffn=True),
                                       ffn_factory=factory)
    assert calls == [0, 1]
    assert model.layers[0].ffn is model.layers[2].ffn
    assert model(torch.randint(0, 50, (1, 4))).shape == (1, 4, 50)
    report = parameter_report(model)
    ffn_params = sum(p.numel() for p in model.layers[0].ffn.parameters())
    assert report["components"]["ffn"] == {"params": 2 * ffn_params, "params_unshared": 4 * ffn_params,
                                           "saved": 2 * ffn_params}
    assert report["params"] == sum(p.numel() for p in model.parameters())


def test_transformer_bad_options():
    with pytest.raises(ValueError, match="sharing must be one of"):
        SharedAttentionTransformer(**small(sharing="every_other"))
    with pytest.raises(ValueError, match=r"n_unique must be an int in \[1, n_layers = 4\]"):
        SharedAttentionTransformer(**small(sharing="cycle", n_unique=5))
    with pytest.raises(ValueError, match="n_unique must be 1 for sharing='all'"):
        SharedAttentionTransformer(**small(sharing="all", n_unique=2))
    with pytest.raises(ValueError, match="n_unique must equal n_layers"):
        SharedAttentionTransformer(**small(sharing="none", n_unique=2))
    with pytest.raises(ValueError, match="activation must be one of"):
        SharedAttentionTransformer(**small(activation="tanh"))
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        SharedAttentionTransformer(**small(embed_dim=0))
    with pytest.raises(ValueError, match="d_model .* must be divisible by n_heads"):
        SharedAttentionTransformer(**small(n_heads=5))
    with pytest.raises(ValueError, match="ffn_factory must be callable"):
        SharedAttentionTransformer(**small(), ffn_factory=3)
    model = SharedAttentionTransformer(**small())
    with pytest.raises(ValueError, match="must not exceed max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must be a 2-D int64 tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="config must be a SharedAttentionConfig"):
        parameter_report(42)


# ---- DDP ----

def _ddp_worker(rank, world, init_file, tokens, state, out_dir, embed_dim):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = SharedAttentionTransformer(**small(sharing="cycle", n_unique=2, embed_dim=embed_dim))
    model.load_state_dict(state)
    ddp = DDP(model)
    shard = tokens.chunk(world)[rank]
    ddp(shard).float().logsumexp(-1).mean().backward()
    torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, f"grad{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("embed_dim", [None, 8])
def test_ddp_two_processes_match_single_process(embed_dim):
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(sharing="cycle", n_unique=2, embed_dim=embed_dim))
    tokens = torch.randint(0, 50, (4, 6))
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_ddp_worker, tokens, model.state_dict(), tmp, embed_dim)
        grads = [torch.load(os.path.join(tmp, f"grad{r}.pt")) for r in range(2)]
    # The mean over the whole batch equals the mean of the two shards' means.
    model(tokens).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[0][name], p.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1][name], p.grad, atol=1e-5, rtol=1e-4)


# ---- FSDP2 ----

def _fsdp_worker(rank, world, init_file, batches, state, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = SharedAttentionTransformer(**small(sharing="cycle", n_unique=2, embed_dim=8))
    model.load_state_dict(state)
    n_params = len(list(model.parameters()))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    sharded = list(model.parameters())
    info = {
        "n_params": (n_params, len(sharded)),
        "all_dtensor": all(isinstance(p, DTensor) for p in sharded),
        # The shared module is still one object, so its sharded parameters too.
        "shared_is_same": model.layers[0].attn.qkv_weight is model.layers[2].attn.qkv_weight,
    }
    sgd_logsumexp_steps(model, [b.chunk(world)[rank] for b in batches])
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # a collective: every rank
    if rank == 0:
        torch.save({"info": info, "params": full}, os.path.join(out_dir, "fsdp.pt"))
    # An orderly teardown: both ranks done with every collective, FSDP's state (and any
    # communication work it holds) released while the group is alive, then the group.
    # Once in a CI run a rank was aborted ("terminate called without an active
    # exception", exit -6) after its collectives had completed; the process then skips
    # interpreter teardown, which has nothing left to do for this test.
    dist.barrier()
    del model, sharded
    gc.collect()
    dist.destroy_process_group()
    os._exit(0)


def test_fsdp2_two_processes_match_single_process():
    """fully_shard (FSDP2, Gloo, CPU) on the root of a shared, factorised model: three
    SGD steps on two half batches give the parameters of single-process training
    on the whole batches; each shared weight is one (sharded) parameter."""
    torch.manual_seed(0)
    model = SharedAttentionTransformer(**small(sharing="cycle", n_unique=2, embed_dim=8))
    state = copy.deepcopy(model.state_dict())
    batches = [torch.randint(0, 50, (4, 6)) for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_fsdp_worker, batches, state, tmp)
        result = torch.load(os.path.join(tmp, "fsdp.pt"))
    unique = len(list(model.parameters()))
    assert unique == len(model.state_dict()) - 4 * 2  # layers 2, 3 repeat layers 0, 1's attention (4 tensors each)
    assert result["info"] == {"n_params": (unique, unique), "all_dtensor": True, "shared_is_same": True}
    # FSDP averages the gradients over ranks: the mean over the whole batch.
    sgd_logsumexp_steps(model, batches)
    assert not torch.equal(model.tok_emb.weight, state["tok_emb.weight"])  # the steps moved the weights
    assert set(result["params"]) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["params"][name], p.detach(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
