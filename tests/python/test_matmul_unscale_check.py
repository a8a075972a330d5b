"""matmul_unscale_check against a float64 reference."""

import pytest
import torch
from torch.library import opcheck

import deepseek_ext
from utils import DEVICES, run_script

OP = torch.ops.deepseek_ext.matmul_unscale_check.default
# Relative Frobenius error allowed, by output dtype: float32 accumulation of
# exact products, then one rounding to the output dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True, params=["native", "via-fp32"])
def cpu_bf16_route(request, monkeypatch):
    """Every test runs under both CPU routes for 16-bit inputs: oneDNN's
    native kernels (bfloat16 where the CPU has AMX-BF16; float16 to a float16
    output where it has AVX512-FP16) and the float32 copies. Yields whether the
    native bfloat16 route is taken."""
    if request.param == "via-fp32":
        monkeypatch.setenv("DEEPSEEK_EXT_CPU_BF16_GEMM", "0")
        monkeypatch.setenv("DEEPSEEK_EXT_CPU_FP16_GEMM", "0")
    else:
        monkeypatch.delenv("DEEPSEEK_EXT_CPU_BF16_GEMM", raising=False)
        monkeypatch.delenv("DEEPSEEK_EXT_CPU_FP16_GEMM", raising=False)
        if not (deepseek_ext._C.cpu_native_bf16_gemm() or deepseek_ext._C.cpu_native_fp16_gemm()):
            pytest.skip("this CPU has no native bfloat16 (AMX-BF16) or float16 (AVX512-FP16) GEMM")
    yield deepseek_ext._C.cpu_native_bf16_gemm()


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


def test_cpu_operand_layouts(cpu_bf16_route):
    # Layouts a BLAS cannot read in place (a column stride, a broadcast b)
    # and size-1 dimensions whose strides are arbitrary: every route either
    # reads them as they are or copies them, and the product is the same.
    gen = torch.Generator().manual_seed(2)
    for dtype in dtypes_for("cpu"):
        def r(*shape):
            return torch.randn(*shape, generator=gen).to(dtype)
        cases = [
            (r(40, 70)[:, ::2], r(35, 9)),                    # a with column stride 2
            (r(20, 35), r(9, 35).t()),                        # b transposed
            (r(20, 35), r(35, 1).expand(35, 6)),              # b broadcast along its columns
            (r(1, 35), r(35, 6)),                             # one row
            (r(20, 1), r(1, 6)),                              # K = 1
            (r(20, 35), r(35, 1)),                            # one column
            (torch.as_strided(r(64), (1, 35), (999, 1)), r(35, 6)),  # a size-1 dim's stride is arbitrary
        ]
        for a, b in cases:
            for out_dtype in (None, torch.float32):
                found = torch.zeros(1)
                out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1), found, out_dtype=out_dtype)
                assert rel_err(out, reference(a, b, 1.0)) < TOL[out_dtype or dtype], (dtype, a.stride(), b.stride())
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
def test_float32_output_flag_with_few_rows_of_k(device, cpu_bf16_route):
    # M*K + K*N < M*N: for a float32 output the CPU decides the flag from the
    # inputs when their largest magnitudes rule an overflow out, and reads the
    # output otherwise (an overflow is possible, or a is not one dense block).
    # Either way the flag must be the output's.
    gen = torch.Generator().manual_seed(5)
    inf, nan = float("inf"), float("nan")
    for dtype in dtypes_for(device):
        def mats():
            return (torch.randn(64, 4, generator=gen).to(dtype).to(device),
                    torch.randn(4, 48, generator=gen).to(dtype).to(device))

        cases = [mats()]
        a, b = mats(); b[2, 47] = nan; cases.append((a, b))
        a, b = mats(); a[63, 0] = -inf; cases.append((a, b))
        a, b = mats(); a[0, 3] = inf; b[3] = 0; cases.append((a, b))  # inf * 0 = NaN
        if dtype != torch.float16:  # float16 inputs cannot overflow a float32 sum of 4 products
            a, b = mats(); a[5, 1] = 1e30; b[1, 7] = 1e30; cases.append((a, b))  # 1e60: overflows
            a, b = mats(); a[5, 1] = 1e30; b[1] = 0; b[2, 3] = 1e30; cases.append((a, b))  # large, finite
        for a, b in cases:
            strided = torch.zeros(64, 8, dtype=dtype, device=device)[:, ::2]
            strided.copy_(a)  # not one dense block of memory
            for a_view in (a, a.t().contiguous().t(), strided):
                found = torch.zeros(1, device=device)
                before = deepseek_ext._C.matmul_unscale_check_cpu_checks_from_inputs()
                out = deepseek_ext.ops.matmul_unscale_check(a_view, b, torch.ones(1, device=device), found,
                                                            out_dtype=torch.float32)
                from_inputs = deepseek_ext._C.matmul_unscale_check_cpu_checks_from_inputs() > before
                want = (~torch.isfinite(out)).any().item()
                assert found.item() == float(want), (dtype, a_view.stride())
                if device == "cpu":  # the input route is taken exactly when it can decide
                    dense = a_view.is_contiguous() or a_view.t().is_contiguous()
                    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
                    no_overflow = finite and a.abs().max().item() * b.abs().max().item() < 1e36
                    # the native bfloat16 route checks each output tile while it is in cache instead
                    native = dtype == torch.bfloat16 and cpu_bf16_route
                    assert from_inputs == (dense and (not finite or no_overflow) and not native), \
                        (dtype, a_view.stride())
                ref = reference(a.cpu(), b.cpu(), 1.0)
                assert torch.equal(torch.isfinite(out.cpu()), torch.isfinite(ref.float()))


@pytest.mark.parametrize("device", DEVICES)
def test_float32_output_flag_with_few_rows_of_k_and_extreme_scales(device):
    # The same shapes under scales that can hide or make an overflow: a NaN
    # scale, and a tiny one under which the unscaled float32 sum overflows
    # (1e60) while the scaled value would not. A BLAS that applies alpha last
    # gives inf there, one that scales a first does not; the flag must follow
    # what the output holds.
    for dtype in [d for d in dtypes_for(device) if d != torch.float16]:
        a = torch.ones(64, 4, dtype=dtype, device=device)
        b = torch.ones(4, 48, dtype=dtype, device=device)
        a[5, 1], b[1, 7] = 1e30, 1e30
        for inv in (float("nan"), 2.0**-100, 2.0**-16):
            found = torch.zeros(1, device=device)
            out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), inv, device=device), found,
                                                        out_dtype=torch.float32)
            assert found.item() == float((~torch.isfinite(out)).any().item()), (dtype, inv)
        found = torch.zeros(1, device=device)
        out = deepseek_ext.ops.matmul_unscale_check(a[:, :2], b[:2], torch.full((1,), float("nan"), device=device),
                                                    found, out_dtype=torch.float32)
        assert found.item() == 1.0 and torch.isnan(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_scale_that_is_not_a_power_of_two(device):
    gen = torch.Generator().manual_seed(3)
    for dtype in dtypes_for(device):
        a = torch.randn(70, 50, generator=gen).to(dtype).to(device)
        b = torch.randn(50, 40, generator=gen).to(dtype).to(device)
        found = torch.zeros(1, device=device)
        out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 0.3, device=device), found,
                                                    out_dtype=torch.float32)
        assert rel_err(out.cpu(), reference(a.cpu(), b.cpu(), torch.tensor(0.3).item())) < TOL[torch.float32]
        assert found.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_zero_or_infinite_inv_scale_follows_ieee(device):
    # out = (a @ b) * inv_scale as IEEE arithmetic says: a zero scale does not
    # hide an inf in the inputs (inf * 0 = NaN), and an infinite one overflows.
    for dtype in dtypes_for(device):
        a = torch.ones(16, 8, dtype=dtype, device=device)
        b = torch.ones(8, 12, dtype=dtype, device=device)
        zero, inf = torch.zeros(1, device=device), torch.full((1,), float("inf"), device=device)
        found = torch.zeros(1, device=device)
        out = deepseek_ext.ops.matmul_unscale_check(a, b, zero, found)
        assert found.item() == 0.0 and (out == 0).all()
        out = deepseek_ext.ops.matmul_unscale_check(a, b, inf, found)
        assert found.item() == 1.0 and torch.isinf(out).all()
        a[3, 5] = float("inf")
        found.zero_()
        out = deepseek_ext.ops.matmul_unscale_check(a, b, zero, found)
        assert found.item() == 1.0 and torch.isnan(out[3]).all() and (out[:3] == 0).all()


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
@pytest.mark.parametrize("dtype, edge", [
    # float16: 65504 is the largest finite value; 65519 rounds (to nearest) to
    # it, 65520 rounds (to even) to inf.
    (torch.float16, [(65504, False), (65519, False), (65520, True)]),
    # bfloat16: (2 - 2^-7) 2^127 is the largest finite value, (2 - 2^-8) 2^127 rounds to inf.
    (torch.bfloat16, [((2 - 2**-7) * 2.0**127, False), ((2 - 2**-8) * 2.0**127, True)]),
])
def test_rounding_edge_of_the_output_dtype(device, dtype, edge):
    # a @ b = 8 * 1024 = 8192 everywhere, exactly (float32 sums, either
    # layout of a); inv_scale = v / 8192 makes s * (a @ b) = v, in float32
    # exactly, just below or on the edge where the one rounding to the output
    # dtype gives inf: a saturating conversion, or scaling after the rounding,
    # would get it wrong.
    for a in (torch.ones(64, 8, dtype=dtype, device=device), torch.ones(8, 64, dtype=dtype, device=device).t()):
        b = torch.full((8, 40), 1024.0, dtype=dtype, device=device)
        for v, flagged in edge:
            found = torch.zeros(1, device=device)
            out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), v / 8192, device=device), found)
            assert found.item() == float(flagged), v
            if flagged:
                assert torch.isinf(out).all()
            else:
                assert (out.double() == torch.tensor(v).to(dtype).double()).all(), v


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


@pytest.mark.parametrize("K", [8, 2200])
def test_cpu_row_panels(K, cpu_bf16_route):
    # A 16 MiB float32 output panel holds 4096 rows of 1024: with a float16
    # output, 4200 rows take two BLAS calls (the second one partial) at a
    # shallow K, and one call at a K deep enough that repacking b per call
    # would cost more. (float32 at the shallow K: the inputs decide the flag.)
    # Either way every row is right and a NaN in the last row is flagged.
    gen = torch.Generator().manual_seed(K)
    for dtype in (torch.float16, torch.float32):
        a = torch.randn(4200, K, generator=gen).to(dtype)
        b = torch.randn(K, 1024, generator=gen).to(dtype)
        found = torch.zeros(1)
        out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 0.25), found)
        assert rel_err(out, reference(a, b, 0.25)) < TOL[dtype]
        assert found.item() == 0.0
        a[4199, 0] = float("nan")
        out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 0.25), found)
        assert found.item() == 1.0 and torch.isnan(out[4199]).all()


def test_cpu_float16_subnormals_are_exact():
    # float16 gradients live near the bottom of its range: subnormal inputs
    # (2^-24 .. 2^-14) must count, not be flushed to zero. Products of float16
    # values are exact in float32, and these sums stay exact too.
    gen = torch.Generator().manual_seed(11)
    a = (torch.randint(-1023, 1024, (37, 66), generator=gen) * 2.0**-24).half()
    b = torch.randint(-8, 9, (66, 45), generator=gen).half()
    ref = a.double() @ b.double()
    for a_view in (a, a.t().contiguous().t()):
        found = torch.zeros(1)
        out = deepseek_ext.ops.matmul_unscale_check(a_view, b, torch.ones(1), found, out_dtype=torch.float32)
        assert torch.equal(out.double(), ref)
        assert found.item() == 0.0


def test_cpu_concurrent_calls_agree(cpu_bf16_route):
    # Calls from several Python threads at once (as from autograd's worker
    # threads or a data-parallel loop), each with its own shapes, give what the
    # same calls give one at a time: no state shared between calls.
    import threading

    gen = torch.Generator().manual_seed(4)
    cases = []
    for i in range(6):
        dtype = (torch.bfloat16, torch.float16, torch.float32)[i % 3]
        M, K, N = 70 + 37 * i, 129 + 64 * i, 90 + 11 * i
        a = torch.randn(K, M, generator=gen).to(dtype).t() if i % 2 else torch.randn(M, K, generator=gen).to(dtype)
        cases.append((a, torch.randn(K, N, generator=gen).to(dtype), (None, torch.float32)[i % 2]))

    def run(a, b, out_dtype):
        found = torch.zeros(1)
        return deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 0.5), found, out_dtype=out_dtype), found

    serial = [run(*c) for c in cases]
    results = [None] * len(cases)

    def worker(i):
        for _ in range(3):
            results[i] = run(*cases[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A BLAS may split its work by the calling thread's team size: the same
    # product up to rounding, not bit for bit. A race would not be that close.
    for (o1, f1), (o2, f2) in zip(serial, results):
        assert o1.dtype == o2.dtype and rel_err(o2, o1.double()) < TOL[o1.dtype]
        assert f1.item() == f2.item() == 0.0


def test_cpu_bf16_conversion_paths_agree(tmp_path, cpu_bf16_route):
    # The brgemm route converts its float32 sums to bfloat16 with AVX512-BF16
    # where the CPU has it; DEEPSEEK_EXT_DISABLE_AVX512=1 (read once per process)
    # forces at::vec's AVX2 conversion. Both round to nearest even: same bits,
    # same flags, overflow to inf included; NaN stays NaN (its payload may differ).
    if not cpu_bf16_route:
        pytest.skip("the float32 route does not use the brgemm conversion")
    script = (
        "import sys, torch, deepseek_ext\n"
        "g = torch.Generator().manual_seed(3)\n"
        "outs = []\n"
        "for big in (False, True):\n"
        "    a = torch.randn(300, 257, generator=g).bfloat16(); b = torch.randn(257, 70, generator=g).bfloat16()\n"
        # row 7: 2^127 * (1.5 + 127/256), finite in float32, halfway between the
        # largest bfloat16 and 2^128: rounds to inf only in the conversion
        "    if big: a[7] = 0; a[7, :2] = 2.0**127; b[0] = 1.5; b[1] = 127 / 256; a[299, 5] = float('nan')\n"
        "    f = torch.zeros(1)\n"
        "    outs.append((deepseek_ext.ops.matmul_unscale_check(a, b, torch.tensor([1.0]), f), f))\n"
        "torch.save(outs, sys.argv[1])\n"
    )
    results = [run_script(script, tmp_path / f"conv{int(disable)}.pt",
                          {"DEEPSEEK_EXT_DISABLE_AVX512": "1" if disable else None}) for disable in (False, True)]
    for (o1, f1), (o2, f2) in zip(*results):
        nan = torch.isnan(o1)
        assert torch.equal(nan, torch.isnan(o2))
        assert torch.equal(o1[~nan].view(torch.int16), o2[~nan].view(torch.int16))
        assert f1.item() == f2.item()
    assert results[0][0][1].item() == 0.0 and results[0][1][1].item() == 1.0
    assert torch.isinf(results[0][1][0]).any() and torch.isnan(results[0][1][0]).any()


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
    sm80_before = deepseek_ext._C.matmul_unscale_check_fused_sm80_calls()
    out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 2.0**-10, device="cuda"), found,
                                                out_dtype=torch.float32)
    if torch.cuda.get_device_capability()[0] == 9 and deepseek_ext._C.with_cutlass_sm90:
        # These shapes are aligned for TMA: the fused kernel must have taken them.
        assert deepseek_ext._C.matmul_unscale_check_fused_sm90_calls() == fused_before + 1
    elif sm80_serves_this_gpu():
        assert deepseek_ext._C.matmul_unscale_check_fused_sm80_calls() == sm80_before + 1
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


# --- The fused sm80 (Ampere) kernel: kernels/matmul_unscale_check_sm80.cu -------------------------
# Each test compares with float64 (or with exact values) on whatever route the GPU takes and, where
# the sm80 kernel serves this GPU, asserts through its call counter that it took (or declined) the call.


def sm80_serves_this_gpu():
    """The fused sm80 kernel has code for this GPU: sm_8x in the default build, any GPU in an
    8.0+PTX build (through the driver's JIT), never Hopper in the default 8.0;9.0a build."""
    return deepseek_ext._C.matmul_unscale_check_sm80_has_code_for(torch.cuda.current_device())


def sm90_takes(out_dtype):
    return (torch.cuda.get_device_capability()[0] == 9 and deepseek_ext._C.with_cutlass_sm90
            and out_dtype == torch.float32)


class Sm80Route:
    """Asserts on exit that the sm80 kernel took the calls in the block (`taken=True`) or none."""

    def __init__(self, taken, calls=1):
        self.want = calls if taken else 0

    def __enter__(self):
        self.before = deepseek_ext._C.matmul_unscale_check_fused_sm80_calls()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            assert deepseek_ext._C.matmul_unscale_check_fused_sm80_calls() - self.before == self.want


@pytest.mark.cuda
def test_cuda_sm80_kernel_serves_ampere():
    if torch.cuda.get_device_capability()[0] != 8 or not deepseek_ext._C.with_cutlass_sm80:
        pytest.skip("needs an sm_8x GPU and a build with the CUTLASS sm80 kernel")
    assert sm80_serves_this_gpu()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, None])
# Residues on every edge of both tiles; (4096, 4096, 4096) has a full wave of 128x256 tiles on
# an A100 (108 SMs): the large-tile kernel. The others take 128x128 tiles.
@pytest.mark.parametrize("shape", [(64, 8, 8), (72, 264, 136), (1000, 520, 776), (4096, 4096, 4096)])
def test_cuda_sm80_wgrad_matches_float64(dtype, out_dtype, shape):
    T, M, N = shape
    a, b = wgrad_operands(T, M, N, dtype, "cuda", seed=T + M)
    found = torch.zeros(1, device="cuda")
    with Sm80Route(sm80_serves_this_gpu() and not sm90_takes(out_dtype)):
        out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 2.0**-10, device="cuda"), found,
                                                    out_dtype=out_dtype)
    want = out_dtype or dtype
    assert out.dtype == want and out.shape == (M, N) and out.is_contiguous()
    assert rel_err(out.cpu(), reference(a.cpu(), b.cpu(), 2.0**-10)) < TOL[want]
    assert found.item() == 0.0
    # The CPU path of the same op agrees to the output dtype's rounding.
    ref = deepseek_ext.ops.matmul_unscale_check(a.cpu(), b.cpu(), torch.full((1,), 2.0**-10), torch.zeros(1),
                                                out_dtype=out_dtype)
    assert rel_err(out.cpu(), ref.double()) < TOL[want]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, acc, inv_finite, inv_inf", [
    # float16: 65504 is the largest finite value, 65520 rounds (to even) to inf.
    (torch.float16, 8 * 1024, 65504 / 8192, 65520 / 8192),
    # bfloat16: (2 - 2^-7) 2^127 is the largest finite value, (2 - 2^-8) 2^127 rounds to inf.
    (torch.bfloat16, 8 * 1024, (2 - 2**-7) * 2.0**114, (2 - 2**-8) * 2.0**114),
])
def test_cuda_sm80_inf_after_conversion_is_flagged(dtype, acc, inv_finite, inv_inf):
    # a^T b = 8 * 1024 everywhere, exactly; inv_scale puts it just below / on the rounding edge.
    T, M, N = 8, 64, 128
    a = torch.ones(T, M, dtype=dtype, device="cuda").t()
    b = torch.full((T, N), 1024.0, dtype=dtype, device="cuda")
    assert acc == T * 1024
    route = sm80_serves_this_gpu()
    for inv, flagged in ((inv_finite, False), (inv_inf, True)):
        found = torch.zeros(1, device="cuda")
        with Sm80Route(route):
            out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), inv, device="cuda"), found)
        assert found.item() == float(flagged)
        assert torch.isinf(out).all().item() == flagged
        if not flagged:
            assert (out.double() == acc * inv).all()
        # The same value is finite in float32: no flag there.
        found = torch.zeros(1, device="cuda")
        with Sm80Route(route and not sm90_takes(torch.float32)):
            out32 = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), inv, device="cuda"), found,
                                                          out_dtype=torch.float32)
        assert found.item() == 0.0 and (out32.double() == acc * inv).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, None])
def test_cuda_sm80_planted_nonfinite_is_flagged(dtype, out_dtype):
    T, M, N = 200, 264, 136  # residues on both edges of a 128x128 tile
    route = sm80_serves_this_gpu() and not sm90_takes(out_dtype)
    for value in (float("inf"), float("-inf"), float("nan")):
        for (t, i) in [(0, 0), (T - 1, M - 1), (100, 131), (T - 1, 0)]:  # corners, last tile, edges
            a, b = wgrad_operands(T, M, N, dtype, "cuda", seed=t + i)
            a[i, t] = value  # writes grad_out[t, i]: row i of the output becomes non-finite
            found = torch.zeros(1, device="cuda")
            with Sm80Route(route):
                out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1, device="cuda"), found,
                                                            out_dtype=out_dtype)
            assert found.item() == 1.0, (value, t, i)
            assert not torch.isfinite(out[i]).any() and torch.isfinite(out[(i + 1) % M]).all()


@pytest.mark.cuda
def test_cuda_sm80_found_inf_accumulates_and_is_not_reset():
    a, b = wgrad_operands(128, 128, 128, torch.float16, "cuda")
    found = torch.ones(1, device="cuda")  # set by an earlier GEMM of the same step
    with Sm80Route(sm80_serves_this_gpu()):
        deepseek_ext.ops.matmul_unscale_check(a, b, torch.ones(1, device="cuda"), found)
    assert found.item() == 1.0


def declined_operands(kind, dtype):
    """Operands the sm80 kernel must decline (the unfused route computes them)."""
    gen = torch.Generator().manual_seed(3)
    T, M, N = 96, 64, 72
    if kind == "row-major a":  # a plain matrix, not grad_out^T
        return torch.randn(M, T, generator=gen).to(dtype).cuda(), torch.randn(T, N, generator=gen).to(dtype).cuda()
    if kind == "column-major b":
        return (torch.randn(T, M, generator=gen).to(dtype).cuda().t(),
                torch.randn(N, T, generator=gen).to(dtype).cuda().t())
    if kind == "M not a multiple of 8":
        return wgrad_operands(T, M + 4, N, dtype, "cuda")
    if kind == "lda not a multiple of 8":  # a = grad_out[:, :M]^T with grad_out rows of M + 3
        gy = torch.randn(T, M + 3, generator=gen).to(dtype).cuda()
        return gy[:, :M].t(), torch.randn(T, N, generator=gen).to(dtype).cuda()
    if kind == "a not 16-byte aligned":  # a view starting one element into its storage
        gy = torch.randn(T * M + 8, generator=gen).to(dtype).cuda()[1:1 + T * M].view(T, M)
        return gy.t(), torch.randn(T, N, generator=gen).to(dtype).cuda()
    raise ValueError(kind)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["row-major a", "column-major b", "M not a multiple of 8",
                                  "lda not a multiple of 8", "a not 16-byte aligned"])
def test_cuda_sm80_declines_other_layouts_and_the_result_is_still_right(dtype, kind):
    a, b = declined_operands(kind, dtype)
    for out_dtype in (torch.float32, None):
        found = torch.zeros(1, device="cuda")
        with Sm80Route(False):
            out = deepseek_ext.ops.matmul_unscale_check(a, b, torch.full((1,), 0.5, device="cuda"), found,
                                                        out_dtype=out_dtype)
        assert rel_err(out.cpu(), reference(a.cpu(), b.cpu(), 0.5)) < TOL[out_dtype or dtype]
        assert found.item() == 0.0
