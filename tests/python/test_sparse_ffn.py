"""Gated sparse FFN ops and module against a masked-dense pure-PyTorch reference."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import deepseek_ext
from utils import DEVICES
from deepseek_ext.nn import GatedSparseFFN, ffn_flops

ops = deepseek_ext.ops
ROUTE = torch.ops.deepseek_ext.sparse_ffn_route.default
FFN = torch.ops.deepseek_ext.sparse_ffn.default
GATHER = torch.ops.deepseek_ext.sparse_ffn_gather.default
COMBINE = torch.ops.deepseek_ext.sparse_ffn_combine.default
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "swiglu")

# ---------------------------------------------------------------- reference


def route_ref(scores, bias, k):
    """(topk_idx, order, offsets): descending scores + bias, ties to the lower index."""
    v = scores.float() + bias
    nb = v.shape[1]
    # Stable descending sort: a lower index wins a tie.
    idx = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(nb + 1, dtype=torch.int64, device=scores.device)
    offsets[1:] = torch.bincount(flat, minlength=nb).cumsum(0)
    return idx, order, offsets


def act_ref(a, activation, block_size):
    if activation == "gelu":
        return F.gelu(a)
    if activation == "gelu_tanh":
        return F.gelu(a, approximate="tanh")
    if activation == "silu":
        return F.silu(a)
    v = a.view(a.shape[0], -1, 2, block_size)
    return (F.silu(v[:, :, 0]) * v[:, :, 1]).reshape(a.shape[0], -1)


def ffn_ref(x, w1, b1, w2, gate, idx, block_size, activation):
    """Every block computed densely, then masked: gate weight on selected blocks, 0 elsewhere."""
    nb = w2.shape[0] // block_size
    a = x @ w1.t() + (b1 if b1 is not None else 0)
    h = act_ref(a, activation, block_size)
    mask = torch.zeros(x.shape[0], nb, dtype=x.dtype, device=x.device).scatter(1, idx, gate)
    return (h.view(x.shape[0], nb, block_size) * mask.unsqueeze(2)).view(x.shape[0], -1) @ w2


def sample_inputs(device, dtype=torch.float32, *, T=37, d_model=24, block_size=8, nb=6, k=2,
                  activation="gelu", bias=True, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = 2 if activation == "swiglu" else 1

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    x = rnd(T, d_model)
    w1 = rnd(nb * m * block_size, d_model, scale=d_model**-0.5)
    b1 = rnd(nb * m * block_size, scale=0.1) if bias else None
    w2 = rnd(nb * block_size, d_model, scale=(nb * block_size) ** -0.5)
    scores = torch.randn(T, nb, generator=g).to(device)
    idx, order, offsets = ops.sparse_ffn_route(scores, torch.zeros(nb, device=device), k)
    gate = rnd(T, k, scale=0.5)
    return dict(x=x, w1=w1, b1=b1, w2=w2, gate=gate, order=order, offsets=offsets,
                block_size=block_size, activation=activation), idx


def op_args(s):
    return (s["x"], s["w1"], s["b1"], s["w2"], s["gate"], s["order"], s["offsets"], s["block_size"],
            s["activation"])


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(200, 16, generator=g).to(device=device, dtype=dtype)
    bias = (torch.randn(16, generator=g) * 0.1).to(device)
    for k in (1, 5, 16):
        idx, order, offsets = ops.sparse_ffn_route(scores, bias, k)
        ridx, rorder, roffsets = route_ref(scores, bias, k)
        torch.testing.assert_close(idx, ridx, rtol=0, atol=0)
        torch.testing.assert_close(order, rorder, rtol=0, atol=0)
        torch.testing.assert_close(offsets, roffsets, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_route_ties_keep_lower_index(device):
    scores = torch.zeros(3, 5, device=device)
    idx, order, offsets = ops.sparse_ffn_route(scores, torch.zeros(5, device=device), 2)
    assert idx.tolist() == [[0, 1]] * 3
    assert order.tolist() == [0, 2, 4, 1, 3, 5]
    assert offsets.tolist() == [0, 3, 6, 6, 6, 6]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nb", [8, 33, 64, 65, 100])
def test_route_widths_and_ties(device, nb):
    """n_blocks <= 64 takes CUDA's warp-per-token kernel, wider routers the
    thread-per-token one: both equal the reference, ties included."""
    g = torch.Generator().manual_seed(nb)
    # Scores on a coarse grid: many exact ties between blocks.
    scores = (torch.randint(-3, 4, (301, nb), generator=g).float() / 2).to(device)
    bias = torch.zeros(nb, device=device)
    bias[::3] = 0.5
    for k in sorted({1, min(5, nb), nb // 2, nb}):
        got = ops.sparse_ffn_route(scores, bias, k)
        for a, b in zip(got, route_ref(scores, bias, k)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- gather / combine


def combine_ref(y, order, k, gate):
    """out[t] = sum_j gate[t, j] * y[pos[t * k + j]], in float64."""
    pos = torch.argsort(order)
    rows = y.double()[pos].view(-1, k, y.shape[1])
    g = torch.ones(rows.shape[:2], dtype=torch.float64, device=y.device) if gate is None else gate.double()
    return (g.unsqueeze(2) * rows).sum(1)


def permute_sample(device, dtype, T=45, D=24, nb=7, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    _, order, _ = ops.sparse_ffn_route(torch.randn(T, nb, generator=g).to(device), torch.zeros(nb, device=device), k)
    y = torch.randn(T * k, D, generator=g).to(device=device, dtype=dtype)
    gate = torch.rand(T, k, generator=g).to(device=device, dtype=dtype) + 0.5
    return x, order, y, gate


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("D", [24, 13])
def test_gather_matches_reference(device, dtype, D):
    x, order, _, _ = permute_sample(device, dtype, D=D)
    out = ops.sparse_ffn_gather(x, order, 3)
    torch.testing.assert_close(out, x[order // 3], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_gate", [True, False])
@pytest.mark.parametrize("D", [24, 13])
def test_combine_matches_reference(device, dtype, with_gate, D):
    _, order, y, gate = permute_sample(device, dtype, D=D)
    out = ops.sparse_ffn_combine(y, order, 3, gate if with_gate else None)
    ref = combine_ref(y, order, 3, gate if with_gate else None)
    assert out.dtype == dtype and out.shape == (45, D)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [4096, 24, 13])
def test_cuda_gather_and_combine_equal_their_cpu_twins(dtype, D):
    x, order, y, gate = permute_sample("cpu", dtype, T=300, D=D, nb=16, k=5)
    for offset in (0, 1):  # offset 1: rows not 16-byte aligned, the scalar kernels
        xc = torch.cat([torch.zeros(offset, dtype=dtype), x.flatten()]).cuda()[offset:].view(x.shape)
        yc = torch.cat([torch.zeros(offset, dtype=dtype), y.flatten()]).cuda()[offset:].view(y.shape)
        torch.testing.assert_close(ops.sparse_ffn_gather(xc, order.cuda(), 5).cpu(),
                                   ops.sparse_ffn_gather(x, order, 5), rtol=0, atol=0)
        for g in (gate, None):
            want = ops.sparse_ffn_combine(y, order, 5, g)
            got = ops.sparse_ffn_combine(yc, order.cuda(), 5, None if g is None else g.cuda()).cpu()
            # Same order of summation, accumulation type and fused multiply-adds:
            # equal up to a last-bit difference of the rounding to dtype.
            tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_combine_is_independent_of_thread_count():
    s, _ = sample_inputs("cpu", T=301, d_model=40, nb=6, k=3, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = ops.sparse_ffn(*op_args(s))
            grads = torch.autograd.grad(out, [s["x"], s["gate"]], torch.ones_like(out))
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_combine_opcheck_and_compile(device):
    x, order, y, gate = permute_sample(device, torch.float32)
    opcheck(GATHER, (x, order, 3))
    opcheck(COMBINE, (y, order, 3, gate))
    opcheck(COMBINE, (y, order, 3, None))

    def roundtrip(x, order, gate):
        return ops.sparse_ffn_combine(ops.sparse_ffn_gather(x, order, 3), order, 3, gate)

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    # Gathering then combining with weights w gives sum_j w[t, j] * x[t].
    torch.testing.assert_close(compiled(x, order, gate), x * gate.sum(1, keepdim=True))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_gather_combine_bad_inputs(device):
    x, order, y, gate = (t.to(device) for t in permute_sample("cpu", torch.float32))
    with pytest.raises(RuntimeError, match="order must be a 1-D int64"):
        ops.sparse_ffn_gather(x, order.int(), 3)
    with pytest.raises(RuntimeError, match="x must be a 2-D"):
        ops.sparse_ffn_gather(x[0], order, 3)
    with pytest.raises(RuntimeError, match="k must be >= 1"):
        ops.sparse_ffn_gather(x, order, 0)
    with pytest.raises(RuntimeError, match="k must be >= 1 and divide"):
        ops.sparse_ffn_combine(y, order, 4)
    with pytest.raises(RuntimeError, match="order must be a 1-D int64 tensor of"):
        ops.sparse_ffn_combine(y, order[:-3], 3)
    with pytest.raises(RuntimeError, match="gate must be"):
        ops.sparse_ffn_combine(y, order, 3, gate[:-1])
    with pytest.raises(RuntimeError, match="gate must have y's dtype"):
        ops.sparse_ffn_combine(y, order, 3, gate.double())
    if device == "cpu":
        with pytest.raises(RuntimeError, match="order must hold pairs"):
            ops.sparse_ffn_gather(x, order + 1000, 3)
        with pytest.raises(RuntimeError, match="order must be a permutation"):
            ops.sparse_ffn_combine(y, torch.zeros_like(order), 3)
        with pytest.raises(RuntimeError, match="must be on the same device"):
            ops.sparse_ffn_combine(y, order, 3, gate.to("meta"))


# ---------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_masked_dense(device, activation, bias):
    s, idx = sample_inputs(device, activation=activation, bias=bias, requires_grad=True)
    out = ops.sparse_ffn(*op_args(s))
    ref = ffn_ref(s["x"], s["w1"], s["b1"], s["w2"], s["gate"], idx, s["block_size"], activation)
    assert rel_err(out, ref) <= 1e-4
    grad = torch.randn_like(out)
    names = ["x", "w1", "w2", "gate"] + (["b1"] if bias else [])
    got = torch.autograd.grad(out, [s[n] for n in names], grad)
    want = torch.autograd.grad(ref, [s[n] for n in names], grad)
    for n, a, b in zip(names, got, want):
        assert rel_err(a, b) <= 1e-4, n


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation):
    s, _ = sample_inputs("cpu", torch.float64, T=7, d_model=5, block_size=3, nb=4, k=2,
                         activation=activation, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w1, b1, w2, gate: ops.sparse_ffn(
        x, w1, b1, w2, gate, s["order"], s["offsets"], 3, activation),
        (s["x"], s["w1"], s["b1"], s["w2"], s["gate"]))


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_gradcheck_float64_without_bias(activation):
    s, _ = sample_inputs("cpu", torch.float64, T=7, d_model=5, block_size=3, nb=4, k=2,
                         activation=activation, bias=False, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w1, w2, gate: ops.sparse_ffn(
        x, w1, None, w2, gate, s["order"], s["offsets"], 3, activation),
        (s["x"], s["w1"], s["w2"], s["gate"]))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_float64_match_masked_dense(activation, bias):
    s, idx = sample_inputs("cpu", torch.float64, T=53, d_model=16, block_size=8, nb=5, k=3,
                           activation=activation, bias=bias, requires_grad=True)
    out = ops.sparse_ffn(*op_args(s))
    ref = ffn_ref(s["x"], s["w1"], s["b1"], s["w2"], s["gate"], idx, s["block_size"], activation)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    names = ["x", "w1", "w2", "gate"] + (["b1"] if bias else [])
    got = torch.autograd.grad(out, [s[n] for n in names], grad)
    want = torch.autograd.grad(ref, [s[n] for n in names], grad)
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=n)


def test_unselected_blocks_get_zero_weight_grads():
    s, idx = sample_inputs("cpu", requires_grad=True, nb=6, k=1, T=3)
    ops.sparse_ffn(*op_args(s)).sum().backward()
    unused = sorted(set(range(6)) - set(idx.flatten().tolist()))
    assert unused
    for b in unused:
        assert s["w1"].grad[b * 8:(b + 1) * 8].abs().max() == 0
        assert s["w2"].grad[b * 8:(b + 1) * 8].abs().max() == 0
        assert s["b1"].grad[b * 8:(b + 1) * 8].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_density_one_equals_dense_ffn(device, activation):
    """All blocks selected with gate 1: exactly the dense FFN (two linears + GELU)."""
    s, _ = sample_inputs(device, nb=4, k=4, activation=activation)
    s["gate"] = torch.ones_like(s["gate"])
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    dense = F.linear(F.gelu(F.linear(s["x"], s["w1"], s["b1"]), approximate=approximate), s["w2"].t())
    assert rel_err(ops.sparse_ffn(*op_args(s)), dense) <= 1e-5


def test_empty_tokens():
    s, _ = sample_inputs("cpu", T=0, requires_grad=True)
    out = ops.sparse_ffn(*op_args(s))
    assert out.shape == (0, 24)
    out.sum().backward()
    assert s["w1"].grad.abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for activation, requires_grad, bias in (("gelu", True, True), ("swiglu", False, True),
                                            ("gelu_tanh", True, True), ("gelu_tanh", True, False)):
        s, _ = sample_inputs(device, activation=activation, requires_grad=requires_grad, bias=bias)
        opcheck(FFN, op_args(s))
    scores = torch.randn(33, 7, device=device)
    opcheck(ROUTE, (scores, torch.zeros(7, device=device), 3))


def test_compile_fullgraph():
    ffn = GatedSparseFFN(32, 64, block_size=16, density=0.5)
    x = torch.randn(2, 9, 32, requires_grad=True)
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    bias_before = ffn.balance_bias.clone()
    y = compiled(x)
    y.sum().backward()
    assert int(ffn.load_counts().sum()) == 18 * ffn.k  # the compiled forward counts its pairs
    gx = x.grad.clone()
    x.grad = None
    ffn.balance_bias.copy_(bias_before)
    y_eager = ffn(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, x.grad)


# ---------------------------------------------------------------- module


def test_module_matches_masked_dense_reference():
    torch.manual_seed(0)
    ffn = GatedSparseFFN(32, 96, block_size=16, density=0.4, shared_blocks=1, activation="swiglu")
    x = torch.randn(4, 5, 32, requires_grad=True)
    y = ffn(x)
    x2 = x.reshape(-1, 32)
    scores = F.linear(x2, ffn.gate_weight)
    idx, _, _ = route_ref(scores.detach(), torch.zeros(ffn.n_routed), ffn.k)
    gate = torch.sigmoid(scores).gather(1, idx) * 2
    # Shared block 0 with gate 1, routed blocks shifted by one.
    full_idx = torch.cat([torch.zeros(20, 1, dtype=torch.int64), idx + 1], 1)
    full_gate = torch.cat([torch.ones(20, 1), gate], 1)
    ref = ffn_ref(x2, ffn.w1, ffn.b1, ffn.w2, full_gate, full_idx, 16, "swiglu") + ffn.b2
    assert y.shape == x.shape
    assert rel_err(y.reshape(-1, 32), ref) <= 1e-4
    params = [x, ffn.w1, ffn.w2, ffn.b1, ffn.gate_weight]
    got = torch.autograd.grad(y.sum(), params)
    want = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4


def module_ref(ffn, x2):
    """A GatedSparseFFN's output for x2 [T, d_model], every block computed densely and masked."""
    s, T = ffn.shared_blocks, x2.shape[0]
    scores = F.linear(x2, ffn.gate_weight)
    idx, _, _ = route_ref(scores.detach(), ffn.balance_bias, ffn.k)
    gate = torch.sigmoid(scores).gather(1, idx) * 2
    full_idx = torch.cat([torch.arange(s).expand(T, s), idx + s], 1)
    full_gate = torch.cat([torch.ones(T, s, dtype=x2.dtype), gate], 1)
    out = ffn_ref(x2, ffn.w1, ffn.b1, ffn.w2, full_gate, full_idx, ffn.block_size, ffn.activation)
    return out if ffn.b2 is None else out + ffn.b2


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_module_float64_matches_masked_dense(activation, bias):
    torch.manual_seed(0)
    ffn = GatedSparseFFN(16, 64, n_blocks=8, density=0.4, shared_blocks=1, activation=activation,
                         bias=bias, dtype=torch.float64)
    assert ffn.block_size == 8 and ffn.k == 3
    x = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    y = ffn(x)
    ref = module_ref(ffn, x.reshape(-1, 16))
    torch.testing.assert_close(y.reshape(-1, 16), ref, rtol=1e-12, atol=1e-12)
    params = [x] + [p for p in ffn.parameters()]
    got = torch.autograd.grad(y.sum(), params)
    want = torch.autograd.grad(ref.sum(), params)
    for p, a, b in zip(["x"] + [n for n, _ in ffn.named_parameters()], got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=p)


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_module_gradcheck_without_bias(activation):
    torch.manual_seed(0)
    ffn = GatedSparseFFN(6, 12, n_blocks=4, density=0.5, activation=activation, bias=False,
                         dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ffn, (x,))


def test_bias_false_has_no_bias_parameters():
    ffn = GatedSparseFFN(16, 64, n_blocks=4, bias=False)
    assert ffn.b1 is None and ffn.b2 is None
    assert set(ffn.state_dict()) == {"w1", "w2", "gate_weight", "balance_bias"}
    assert "bias=False" in repr(ffn)
    assert set(GatedSparseFFN(16, 64, n_blocks=4).state_dict()) == {
        "w1", "b1", "w2", "b2", "gate_weight", "balance_bias"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16


def dense_mlp(ffn, x):
    """The dense FFN with a GatedSparseFFN's weights (swiglu: per block, gate rows then up rows)."""
    b1 = ffn.b1 if ffn.b1 is not None else torch.zeros(ffn.w1.shape[0], dtype=x.dtype)
    a = F.linear(x, ffn.w1, b1)
    if ffn.activation == "swiglu":
        v = a.view(x.shape[0], ffn.n_blocks, 2, ffn.block_size)
        h = (F.silu(v[:, :, 0]) * v[:, :, 1]).reshape(x.shape[0], -1)
    else:
        h = act_ref(a, ffn.activation, ffn.block_size)
    out = h @ ffn.w2
    return out if ffn.b2 is None else out + ffn.b2


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_zero_gate_at_density_one_is_the_dense_ffn(activation, bias):
    """gate_weight = 0 gives every block weight 2 * sigmoid(0) = 1 (what a converter relies on)."""
    torch.manual_seed(0)
    ffn = GatedSparseFFN(16, 64, n_blocks=4, density=1.0, activation=activation, bias=bias,
                         dtype=torch.float64)
    with torch.no_grad():
        ffn.gate_weight.zero_()
    x = torch.randn(9, 16, dtype=torch.float64)
    torch.testing.assert_close(ffn(x), dense_mlp(ffn, x), rtol=1e-12, atol=1e-12)


def test_n_blocks_and_block_size():
    assert GatedSparseFFN(16, 64, n_blocks=4).block_size == 16
    assert GatedSparseFFN(16, 64, block_size=16).n_blocks == 4
    assert GatedSparseFFN(16, 64, n_blocks=4, block_size=16).n_blocks == 4
    assert GatedSparseFFN(16, 256).n_blocks == 16  # neither given: DEFAULT_N_BLOCKS
    assert GatedSparseFFN(16, 256).block_size == 16
    with pytest.raises(ValueError, match="n_blocks and block_size disagree"):
        GatedSparseFFN(16, 64, n_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="n_blocks must divide d_ff"):
        GatedSparseFFN(16, 64, n_blocks=5)
    with pytest.raises(ValueError, match="n_blocks must be positive"):
        GatedSparseFFN(16, 64, n_blocks=0)
    with pytest.raises(TypeError):
        GatedSparseFFN(16, 64, 16)  # everything after d_ff is a keyword


def test_k_rounds_half_up():
    # 0.25 * 10 = 2.5 -> 3 (as std::llround in the C++ module), 0.3 * 16 = 4.8 -> 5.
    assert GatedSparseFFN(8, 40, n_blocks=10, density=0.25).k == 3
    assert GatedSparseFFN(8, 64, n_blocks=16, density=0.3).k == 5
    assert GatedSparseFFN(8, 64, n_blocks=16, density=1.0, shared_blocks=2).k == 14
    assert ffn_flops(8, 40, n_blocks=10, density=0.25)["k"] == 3


def test_compile_fullgraph_gelu_tanh_without_bias():
    torch.manual_seed(0)
    ffn = GatedSparseFFN(32, 64, n_blocks=4, density=0.5, activation="gelu_tanh", bias=False,
                         balance_rate=0.0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y = torch.compile(ffn, fullgraph=True, backend="aot_eager")(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    y_eager = ffn(x)
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, gx_eager)


def test_shared_blocks_always_active():
    torch.manual_seed(0)
    ffn = GatedSparseFFN(16, 64, block_size=16, density=0.25, shared_blocks=2)
    x = torch.randn(50, 16)
    ffn(x).sum().backward()
    # Shared blocks 0 and 1 get gradient in every hidden row; the gate never sees them.
    assert (ffn.w1.grad[:32].abs().sum(1) > 0).all()
    assert ffn.gate_weight.shape[0] == 2 and ffn.k == 1


def test_balancing_bias_moves_skewed_load_toward_uniform():
    torch.manual_seed(0)
    ffn = GatedSparseFFN(16, 128, block_size=16, density=0.25, balance_rate=0.1)
    with torch.no_grad():
        ffn.gate_weight.mul_(0.5)
        ffn.gate_weight[0].add_(0.5)  # block 0 wins for every token
    x = torch.randn(512, 16).abs()
    ffn.train()
    ffn(x)
    uniform = torch.full((ffn.n_routed,), 1 / ffn.n_routed)
    first = (ffn.block_load() - uniform).abs().sum()
    for _ in range(100):
        ffn.update_balance()  # what an optimizer step does
        ffn(x)
    last = (ffn.block_load() - uniform).abs().sum()
    assert last < 0.5 * first, (first, last)
    # The bias only steers selection: no gradient ever reaches it.
    assert not ffn.balance_bias.requires_grad
    ffn.eval()
    ffn.update_balance()
    before = ffn.balance_bias.clone()
    ffn(x)
    ffn.update_balance()  # evaluation counted nothing
    torch.testing.assert_close(ffn.balance_bias, before)


def test_dtype_conversion_keeps_bias_float32():
    ffn = GatedSparseFFN(16, 64, block_size=16, density=0.5).to(torch.float64)
    assert ffn.w1.dtype == torch.float64 and ffn.balance_bias.dtype == torch.float32
    y = ffn(torch.randn(5, 16, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert ffn.balance_bias.dtype == torch.float32


def test_aux_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    ffn = GatedSparseFFN(16, 64, block_size=16, density=0.5)
    ffn(x)
    assert ffn.aux_loss.item() == 0
    ffn = GatedSparseFFN(16, 64, block_size=16, density=0.5, aux_loss_weight=0.01)
    ffn(x)
    assert ffn.aux_loss.item() > 0
    ffn.aux_loss.backward()
    assert ffn.gate_weight.grad.abs().sum() > 0


def test_no_host_sync_in_training_step(monkeypatch):
    """Forward, backward and the bias update never read a tensor on the host."""
    ffn = GatedSparseFFN(16, 64, block_size=16, density=0.5, aux_loss_weight=0.1)
    x = torch.randn(20, 16)
    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "numpy"):
        def forbid(*args, _name=name, **kwargs):
            raise AssertionError(f"host sync: Tensor.{_name}")
        monkeypatch.setattr(torch.Tensor, name, forbid)
    y = ffn(x)
    (y.sum() + ffn.aux_loss).backward()
    ffn.block_load()
    torch.optim.SGD(ffn.parameters(), lr=0.1).step()  # the balancing update


@pytest.mark.cuda
def test_no_cuda_sync_in_training_step():
    ffn = GatedSparseFFN(64, 512, block_size=128, density=0.5).cuda().bfloat16()
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    opt = torch.optim.SGD(ffn.parameters(), lr=0.1)
    ffn(x).sum().backward()  # warm-up
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ffn(x).sum().backward()
        opt.step()  # with the balancing update
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_bfloat16_matches_masked_dense_float64(activation, bias):
    """The CUDA path in bfloat16, forward and backward, against the float64 reference."""
    s, idx = sample_inputs("cpu", torch.float64, T=300, d_model=64, block_size=32, nb=8, k=3,
                           activation=activation, bias=bias, requires_grad=True)
    ref = ffn_ref(s["x"], s["w1"], s["b1"], s["w2"], s["gate"], idx, 32, activation)
    grad = torch.randn_like(ref)
    names = ["x", "w1", "w2", "gate"] + (["b1"] if bias else [])
    want = torch.autograd.grad(ref, [s[n] for n in names], grad)
    sc = {n: (v.detach().cuda().bfloat16().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
              else v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in s.items()}
    out = ops.sparse_ffn(*op_args(sc))
    assert rel_err(out.double().cpu(), ref) < 2e-2
    got = torch.autograd.grad(out, [sc[n] for n in names], grad.cuda().bfloat16())
    for n, a, b in zip(names, got, want):
        assert rel_err(a.double().cpu(), b) < 3e-2, n


def test_ffn_flops():
    f = ffn_flops(512, 2048, block_size=128, density=0.3)
    assert f["dense"] == 2 * 512 * 2048 * 2
    assert f["k"] == 5 and f["active_blocks"] == 5
    assert f["gate"] == 2 * 512 * 16
    assert f["sparse"] == 2 * 512 * 5 * 128 * 2 + f["gate"]
    assert abs(f["ratio"] - f["sparse"] / f["dense"]) < 1e-12
    assert ffn_flops(512, 2048, density=1.0)["ratio"] > 1.0  # the gate costs a little
    sw = ffn_flops(512, 2048, activation="swiglu", density=0.5, shared_blocks=2)
    assert sw["dense"] == 2 * 512 * 2048 * 3 and sw["active_blocks"] == 10


# ---------------------------------------------------------------- bad inputs


def test_bad_module_config():
    with pytest.raises(ValueError, match="block_size must divide d_ff"):
        GatedSparseFFN(16, 100, block_size=16)
    with pytest.raises(ValueError, match="density must be in"):
        GatedSparseFFN(16, 64, block_size=16, density=0.0)
    with pytest.raises(ValueError, match="density must be in"):
        GatedSparseFFN(16, 64, block_size=16, density=1.5)
    with pytest.raises(ValueError, match="activation must be"):
        GatedSparseFFN(16, 64, block_size=16, activation="relu")
    with pytest.raises(ValueError, match="activation must be"):
        GatedSparseFFN(16, 64, block_size=16, activation="gelu_new")
    with pytest.raises(ValueError, match="shared_blocks"):
        GatedSparseFFN(16, 64, block_size=16, shared_blocks=4)
    with pytest.raises(ValueError, match="d_model"):
        GatedSparseFFN(16, 64, block_size=16)(torch.randn(3, 8))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_op_inputs(device):
    s, _ = sample_inputs("cpu")
    if device == "meta":
        s = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in s.items()}

    def call(**over):
        ops.sparse_ffn(*op_args({**s, **over}))

    with pytest.raises(RuntimeError, match="w1 must have x's dtype"):
        call(w1=s["w1"].double())
    with pytest.raises(RuntimeError, match="w2 must be"):
        call(w2=s["w2"][:-1])
    with pytest.raises(RuntimeError, match="block_size must be positive"):
        call(block_size=0)
    with pytest.raises(RuntimeError, match="activation must be"):
        call(activation="relu")
    with pytest.raises(RuntimeError, match="order and offsets must be int64"):
        call(order=s["order"].int())
    with pytest.raises(RuntimeError, match="offsets must be a 1-D tensor"):
        call(offsets=s["offsets"][:-1])
    with pytest.raises(RuntimeError, match="x must be float32"):
        call(x=s["x"].int())
    with pytest.raises(RuntimeError, match="gate must be"):
        call(gate=s["gate"][:-1])
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.sparse_ffn_route(torch.randn(4, 3, device=device), torch.zeros(3, device=device), 4)
    with pytest.raises(RuntimeError, match="bias must be a float32"):
        ops.sparse_ffn_route(torch.randn(4, 3, device=device), torch.zeros(3, device=device).double(), 1)


def test_bad_devices_and_offsets():
    s, _ = sample_inputs("cpu")
    with pytest.raises(RuntimeError, match="must be on the same device as x|must be a cpu tensor"):
        ops.sparse_ffn(*op_args({**s, "w1": s["w1"].to("meta")}))
    bad = s["offsets"].clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="offsets must run from 0"):
        ops.sparse_ffn(*op_args({**s, "offsets": bad}))
    with pytest.raises(RuntimeError, match="order must be a permutation"):
        ops.sparse_ffn(*op_args({**s, "order": s["order"] + 1000}))
