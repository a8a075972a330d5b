"""matmul_unscale_check against a float64 reference."""

import pytest
import torch
from torch.testing._internal.optests import opcheck

import deepseek_ext
from conftest import DEVICES

OP = torch.ops.deepseek_ext.matmul_unscale_check.default
# Relative Frobenius error allowed, by output dtype: float32 accumulation of
# exact products, then one rounding to the output dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def dtypes_for(device):
    return [torch.float16, torch.bfloat16] + ([torch.float32] if device == "cpu" else [])


def reference(a, b, inv):
    return (a.double() @ b.double()) * inv


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 33, 65), (128, 64, 96), (257, 129, 63), (300, 1000, 7)])
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_float64(device, shape, transposed):
    M, K, N = shape
    for dtype in dtypes_for(device):
        for out_dtype in (None, torch.float32):
            gen = torch.Generator().manual_seed(M * 7 + K)
            a = torch.randn(K, M, generator=gen).to(dtype).to(device).t() if transposed else \
                torch.randn(M, K, generator=gen).to(dtype).to(device)
            b = torch.randn(K, N, generator=gen).to(dtype).to(device)
            inv = 2.0**-7
            found = torch.zeros(1, device=device)
            out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), inv, device=device), found,
                                                        out_dtype=out_dtype)
            want = out_dtype or dtype
            assert out.dtype == want and out.shape == (M, N) and out.is_contiguous()
            assert rel_err(out.cpu(), reference(a.cpu(), b.cpu(), inv)) < TOL[want]
            assert found.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_planted_nonfinite_is_flagged(device, value):
    gen = torch.Generator().manual_seed(1)
    for dtype in dtypes_for(device):
        for (i, j) in [(0, 0), (199, 0), (5, 6), (199, 99)]:  # corners, last tile, edges
            a = torch.randn(200, 40, generator=gen).to(dtype).to(device)
            b = torch.randn(40, 100, generator=gen).to(dtype).to(device)
            a[i, j % 40] = value
            found = torch.zeros(1, device=device)
            deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1, device=device), found)
            assert found.item() == 1.0, (dtype, i, j)


@pytest.mark.parametrize("device", DEVICES)
def test_overflow_in_float16_output_is_flagged(device):
    # 300 * 300 * 4 = 360000 > 65504: finite in float32, inf in float16.
    a = torch.full((8, 4), 300.0, dtype=torch.float16, device=device)
    b = torch.full((4, 8), 300.0, dtype=torch.float16, device=device)
    found = torch.zeros(1, device=device)
    out32 = deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1, device=device), found, out_dtype=torch.float32)
    assert found.item() == 0.0 and out32[0, 0].item() == 360000.0
    out16 = deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1, device=device), found)
    assert found.item() == 1.0 and torch.isinf(out16).all()
    # ... and unscaling first brings it back into range.
    found.zero_()
    out16 = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 0.125, device=device), found)
    assert found.item() == 0.0 and out16[0, 0].item() == torch.tensor(45000.0).half().item()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    found = torch.zeros(1, device=device)
    s = torch.full((1,), 0.5, device=device)
    out = deepseek_ext.ops.matmul_unscale_check(torch.empty(5, 0, dtype=torch.float16, device=device),
                                                torch.empty(0, 3, dtype=torch.float16, device=device), s, found)
    assert out.shape == (5, 3) and (out == 0).all()
    out = deepseek_ext.ops.matmul_unscale_check(torch.empty(0, 4, dtype=torch.bfloat16, device=device),
                                                torch.ones(4, 3, dtype=torch.bfloat16, device=device), s, found,
                                                out_dtype=torch.float32)
    assert out.shape == (0, 3) and out.dtype == torch.float32
    assert found.item() == 0.0


def test_bad_inputs_name_the_argument():
    a = torch.ones(4, 3, dtype=torch.float16)
    b = torch.ones(3, 2, dtype=torch.float16)
    s, f = torch.ones(1), torch.zeros(1)
    cases = [
        ((torch.ones(4, 3, 1, dtype=torch.float16), b, s, f), {}, r"a must be a 2-D matrix"),
        ((a, torch.ones(4, 2, dtype=torch.float16), s, f), {}, r"a and b shapes cannot be multiplied"),
        ((a, b.float(), s, f), {}, r"b must have a's dtype"),
        ((a.int(), b.int(), s, f), {}, r"a must be float16, bfloat16 or float32"),
        ((a, b, s.double(), f), {}, r"inv_scale must be a float32 tensor"),
        ((a, b, s, torch.zeros(2)), {}, r"found_inf must have exactly one element"),
        ((a, b, s, f), {"out_dtype": torch.bfloat16}, r"out_dtype must be float32 or the inputs' dtype"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            deepseek_ext.ops.matmul_unscale_check(*args, **kw)
        with pytest.raises(RuntimeError, match=msg):  # the fake kernel says the same
            OP(*[t.to("meta") for t in args], **kw)
    assert f.item() == 0.0


def sample_inputs(device):
    for dtype in (torch.float16, torch.bfloat16):
        a = torch.randn(33, 17).to(dtype).to(device)
        yield (a, torch.randn(17, 9).to(dtype).to(device), torch.full((1,), 0.5, device=device),
               torch.zeros(1, device=device)), {"out_dtype": torch.float32}
        yield (a.t(), torch.randn(33, 5).to(dtype).to(device), torch.ones(1, device=device),
               torch.zeros(1, device=device)), {}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args, kwargs in sample_inputs(device):
        opcheck(OP, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def wgrad(gy, x, inv, found):
        return deepseek_ext.ops.matmul_unscale_check(gy.t(), x, inv, found, out_dtype=torch.float32) + 1

    compiled = torch.compile(wgrad, fullgraph=True)
    gy = torch.randn(64, 16).to(torch.bfloat16).to(device)
    x = torch.randn(64, 8).to(torch.bfloat16).to(device)
    x[3, 3] = float("inf")
    f1, f2 = torch.zeros(1, device=device), torch.zeros(1, device=device)
    inv = torch.full((1,), 0.25, device=device)
    torch.testing.assert_close(compiled(gy, x, inv, f1), wgrad(gy, x, inv, f2), equal_nan=True)
    assert f1.item() == f2.item() == 1.0


def test_torchscript():
    @torch.jit.script
    def wgrad(gy: torch.Tensor, x: torch.Tensor, inv: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        return torch.ops.deepseek_ext.matmul_unscale_check(gy.t(), x, inv, found, out_dtype=torch.float32)

    gy, x = torch.randn(32, 6).half(), torch.randn(32, 5).half()
    out = wgrad(gy, x, torch.full((1,), 0.5), torch.zeros(1))
    assert rel_err(out, reference(gy.t(), x, 0.5)) < 1e-5


@pytest.mark.cuda
def test_cuda_matches_cpu():
    a = torch.randn(513, 257).half()
    b = torch.randn(257, 129).half()
    f = torch.zeros(1, device="cuda")
    out = deepseek_ext.ops.matmul_unscale_check(a.cuda().t().contiguous().t(), b.cuda(),
                                                torch.full((1,), 0.5, device="cuda"), f, out_dtype=torch.float32)
    ref = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 0.5), torch.zeros(1), out_dtype=torch.float32)
    assert rel_err(out.cpu(), ref.double()) < 1e-5 and f.item() == 0.0


def wgrad_operands(T, M, N, dtype, device, seed=0):
    """a = grad_out^T (column-major view), b = input (row-major): the layout of a
    Linear weight gradient, which the fused sm90 kernel takes when 16-byte aligned."""
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(T, M, generator=gen).to(dtype).to(device)
    x = torch.randn(T, N, generator=gen).to(dtype).to(device)
    return gy.t(), x


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# (4096, 4096, 4096) has a full wave of 128x256 tiles: the large-tile kernel.
@pytest.mark.parametrize("shape", [(64, 8, 8), (72, 264, 136), (1024, 512, 768), (4096, 1000, 1016),
                                   (4096, 4096, 4096)])
def test_cuda_wgrad_layout_matches_float64(dtype, shape):
    T, M, N = shape
    a, b = wgrad_operands(T, M, N, dtype, "cuda")
    found = torch.zeros(1, device="cuda")
    fused_before = deepseek_ext._C.matmul_unscale_check_fused_sm90_calls()
    out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 2.0**-10, device="cuda"), found,
                                                out_dtype=torch.float32)
    if torch.cuda.get_device_capability()[0] == 9 and deepseek_ext._C.with_cutlass_sm90:
        # These shapes are aligned for TMA: the fused kernel must have taken them.
        assert deepseek_ext._C.matmul_unscale_check_fused_sm90_calls() == fused_before + 1
    assert rel_err(out.cpu(), reference(a.cpu(), b.cpu(), 2.0**-10)) < 1e-5
    assert found.item() == 0.0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_wgrad_layout_flags_every_planted_value(dtype):
    T, M, N = 256, 264, 136  # not a multiple of any tile: residues on both edges
    for value in (float("inf"), float("nan")):
        for (t, i) in [(0, 0), (T - 1, M - 1), (100, 131)]:
            a, b = wgrad_operands(T, M, N, dtype, "cuda", seed=t + i)
            a[i, t] = value  # a is a view: this writes grad_out[t, i]
            found = torch.zeros(1, device="cuda")
            deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1, device="cuda"), found, out_dtype=torch.float32)
            assert found.item() == 1.0, (value, t, i)


@pytest.mark.cuda
def test_cuda_found_inf_accumulates_across_calls():
    a, b = wgrad_operands(128, 128, 128, torch.float16, "cuda")
    found = torch.ones(1, device="cuda")  # set by an earlier GEMM of the same step
    deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1, device="cuda"), found, out_dtype=torch.float32)
    assert found.item() == 1.0


@pytest.mark.cuda
def test_cuda_float32_overflow_in_output_is_flagged():
    a = torch.full((64, 128), 60000.0, dtype=torch.float16, device="cuda").t()
    b = torch.full((64, 128), 60000.0, dtype=torch.float16, device="cuda")
    found = torch.zeros(1, device="cuda")
    # 64 * 6e4^2 = 2.3e11: finite in float32 ...
    deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1, device="cuda"), found, out_dtype=torch.float32)
    assert found.item() == 0.0
    # ... and inf once multiplied by 2^100.
    deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 2.0**100, device="cuda"), found,
                                          out_dtype=torch.float32)
    assert found.item() == 1.0


@pytest.mark.cuda
def test_cuda_linear_training_step_has_no_host_sync():
    model = torch.nn.Sequential(deepseek_ext.nn.Linear(256, 512), torch.nn.GELU(),
                                deepseek_ext.nn.Linear(512, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = deepseek_ext.amp.DynamicLossScaler("cuda")
    x = torch.randn(64, 256, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(17):  # past two of the scaler's every-8-updates stuck checks
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
