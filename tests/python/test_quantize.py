"""int8 gradient quantisation ops against a pure-PyTorch reference.

The reference below re-implements the whole specification with torch ops,
Philox4x32-10 included, so both rounding modes are compared bit for bit.
"""

import math

import pytest
import torch
from torch.library import opcheck

import deepseek_ext
from utils import DEVICES, run_script

ops = deepseek_ext.ops
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT = torch.ops.deepseek_ext.quantize_int8.default
QUANT_EF = torch.ops.deepseek_ext.quantize_int8_ef_.default
DEQUANT = torch.ops.deepseek_ext.dequantize_int8.default
REDUCE = torch.ops.deepseek_ext.dequantize_reduce_int8.default

# ---------------------------------------------------------------- reference

M32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of a * m for a < 2^32 (int64 tensor), without overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * m  # < 2^48
    t = a_hi * m + (lo_part >> 16)  # < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox_words(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Word index % 4 of Philox4x32-10 at counter {index // 4 (64 bit), 0, 0}, key seed."""
    blk = index >> 2
    c0, c1 = blk & M32, (blk >> 32) & M32
    c2 = torch.zeros_like(blk)
    c3 = torch.zeros_like(blk)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    words = torch.stack([c0, c1, c2, c3], dim=-1)
    return words.gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)


def quantize_ref(x, block_size=256, stochastic=False, seed=0, offset=0, residual=None):
    """(q, scales, new_residual or None) following detail/int8_quant.h with torch ops."""
    y = x.reshape(-1).float()
    if residual is not None:
        y = y + residual.reshape(-1).float()
    n = y.numel()
    nb = (n + block_size - 1) // block_size
    yb = torch.zeros(nb * block_size, dtype=torch.float32, device=x.device)
    yb[:n] = y
    yb = yb.view(nb, block_size)
    amax_bits = (yb.view(torch.int32) & 0x7FFFFFFF).amax(dim=1) if nb else \
        torch.zeros(0, dtype=torch.int32, device=x.device)
    nonfinite = amax_bits >= 0x7F800000
    # A tensor divisor: on CUDA torch turns division by a Python scalar into a multiplication
    # by its reciprocal, which is not the correctly rounded quotient the kernels compute.
    scales = amax_bits.view(torch.float32) / torch.full((), 127.0, device=x.device)
    scales = torch.where(nonfinite, torch.full_like(scales, float("nan")), scales)
    ok = (scales > 0).unsqueeze(1)
    safe = torch.where(ok, scales.unsqueeze(1), torch.ones_like(scales).unsqueeze(1))
    if stochastic:
        # y * RN(1 / scale), one multiplication, for 2^-90 <= scale <= 2^90; y / scale outside.
        inv = torch.ones_like(safe) / safe
        by_reciprocal = (safe >= 2.0**-90) & (safe <= 2.0**90)
        v = torch.where(by_reciprocal, yb * inv, yb / safe)
        idx = torch.arange(nb * block_size, dtype=torch.int64, device=x.device) + offset
        u = (philox_words(seed, idx) >> 9).float().view(nb, block_size) * 2.0**-23
        f = torch.floor(v)
        r = f + (u < v - f).float()
    else:
        r = torch.round(yb / safe)  # half to even
    r = torch.where(ok, r.clamp(-127, 127), torch.zeros_like(r))
    q = r.reshape(-1)[:n].to(torch.int8).view(x.shape)
    new_res = None
    if residual is not None:
        s_elem = scales.repeat_interleave(block_size)[:n].double()
        # y - q * scale, exact in float64, rounded once to float32 (= the kernels' fma).
        e = (y.double() - q.reshape(-1).double() * torch.nan_to_num(s_elem, nan=0.0)).float()
        keep = torch.isnan(s_elem)  # non-finite blocks keep their residual
        e = torch.where(keep, residual.reshape(-1).float(), e)
        new_res = e.to(residual.dtype).view(residual.shape)
    return q, scales, new_res


def dequantize_ref(q, scales, block_size, dtype=torch.float32):
    s = scales.repeat_interleave(block_size)[: q.numel()]
    return (q.reshape(-1).float() * s).to(dtype).view(q.shape)


def dequantize_reduce_ref64(q, scales, block_size, multiplier):
    s = scales.double().repeat_interleave(block_size, dim=1)[:, : q.shape[1]]
    return multiplier * (q.double() * s).sum(0)


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def assert_ef_matches_reference(x, r, block_size, stochastic, seed, offset):
    """quantize_int8_ef_ against the reference, which reads r before the op
    updates it: q, the scales and the new residual equal it bit for bit."""
    q_ref, s_ref, r_ref = quantize_ref(x, block_size, stochastic, seed, offset, residual=r)
    q, s = ops.quantize_int8_ef_(x, r, block_size, stochastic, seed, offset)
    assert_bitwise(q, q_ref)
    assert_bitwise(s, s_ref)
    assert_bitwise(r, r_ref)


def rand(n, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # Blocks of very different magnitudes, as real gradients have.
    mags = 10.0 ** torch.randint(-6, 3, ((n + 31) // 32,), generator=g).float()
    x = torch.randn(n, generator=g) * mags.repeat_interleave(32)[:n] * scale
    return x.to(dtype).to(device)


def exponent_range_input(n, bs, dtype, gen):
    """Blocks across the whole float32 exponent range (scales inside and outside
    2^-90..2^90), zeros of both signs, subnormals, tiny quotients and near-ties."""
    nb = (n + bs - 1) // bs
    exps = torch.randint(-135, 125, (nb,), generator=gen).float()
    x = torch.randn(n, generator=gen) * torch.pow(2.0, exps).repeat_interleave(bs)[:n]
    x[:bs] = 0.0
    x[1:bs:2] = -0.0
    x[bs:2 * bs] = torch.randn(bs, generator=gen) * 2.0**-140  # subnormals
    x[2 * bs:3 * bs] = torch.arange(bs, dtype=torch.float32) - 127.5  # absmax 127.5: many near-ties
    x[3 * bs:4 * bs] = torch.randn(bs, generator=gen) * 2.0**-110  # quotients below 2^-100 ...
    x[3 * bs] = 1.0  # ... next to a large absmax
    x[4 * bs:5 * bs:3] = -0.0  # signed zeros inside a normal block
    return x.to(dtype)


SIZES = [0, 1, 31, 32, 255, 256, 1000, 4096 + 7, 70001]
BLOCKS = [32, 96, 256, 4096]


# ---------------------------------------------------------------- quantize

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block_size", BLOCKS)
def test_rne_matches_reference(device, dtype, n, block_size):
    x = rand(n, dtype, device, seed=n + block_size)
    q, s = ops.quantize_int8(x, block_size)
    q_ref, s_ref, _ = quantize_ref(x, block_size)
    assert_bitwise(q, q_ref)
    assert_bitwise(s, s_ref)
    assert s.shape == ((n + block_size - 1) // block_size,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 255, 4096 + 7, 70001])
@pytest.mark.parametrize("block_size", [32, 96, 256, 4096])
@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 1), (2**40 + 3, 2), (7, 3), (12345, 2**33 + 5)])
def test_stochastic_matches_reference(device, dtype, n, block_size, seed, offset):
    x = rand(n, dtype, device, seed=n)
    q, s = ops.quantize_int8(x, block_size, stochastic=True, seed=seed, offset=offset)
    q_ref, s_ref, _ = quantize_ref(x, block_size, True, seed, offset)
    assert_bitwise(q, q_ref)
    assert_bitwise(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
def test_matches_reference_across_exponent_range(device, dtype, stochastic):
    """Blocks whose scales lie outside 2^-90..2^90 (where stochastic rounding
    divides instead of multiplying by the reciprocal), subnormals, signed zeros
    and near-ties: q, scales and the residual equal the reference bit for bit."""
    n, bs = 200_003, 256
    gen = torch.Generator().manual_seed(12)
    x = exponent_range_input(n, bs, dtype, gen).to(device)
    if dtype != torch.float16:  # float16 has no such scales (its range is inf / 0 there)
        s_ref_all = quantize_ref(x, bs)[1]
        assert ((s_ref_all > 0) & (s_ref_all < 2.0**-90)).any() and (s_ref_all > 2.0**90).any()
    q, s = ops.quantize_int8(x, bs, stochastic, 5, 3)
    q_ref, s_ref, _ = quantize_ref(x, bs, stochastic, 5, 3)
    assert_bitwise(q, q_ref)
    assert_bitwise(s, s_ref)
    r = (torch.randn(n, generator=gen) * 1e-3).to(device)
    r[bs:4 * bs] = 0.0
    assert_ef_matches_reference(x, r, bs, stochastic, 5, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 3])
def test_stochastic_quotient_is_y_times_reciprocal(device, offset):
    """Stochastic rounding rounds v = RN(y * RN(1 / scale)), not RN(y / scale)
    (int8q::sr_quotient). Random inputs can hardly tell the two apart (they
    differ by an ulp, which moves q only when u falls in between), so each y
    here is chosen, from the element's own Philox word, so that v sits exactly
    on u (q = 0) or one float above it (q = 1), and where possible so that
    RN(y / scale) is another float: a kernel that divides gets a different q."""
    bs, nb, seed = 256, 64, 21
    n = bs * nb
    idx = torch.arange(n, dtype=torch.int64) + offset
    u = (philox_words(seed, idx) >> 9).float() * 2.0**-23
    scale = torch.tensor(3.0) / torch.tensor(127.0)  # float32, as the kernels compute it
    inv = torch.tensor(1.0) / scale
    up = torch.arange(n) % 2 == 1
    target = torch.where(up, torch.nextafter(u, torch.tensor(2.0)), u)  # v: on u, or just above
    y0 = (target.double() * scale.double()).float()
    best = torch.full((n,), float("nan"))
    found_div_differs = torch.zeros(n, dtype=torch.bool)
    for d in (0, 1, -1, 2, -2, 3, -3):
        y = (y0.view(torch.int32) + d).view(torch.float32)
        mul_ok = (y * inv == target) & (target > 0)
        div_differs = mul_ok & (y / scale != target)
        take = div_differs & ~found_div_differs
        best = torch.where(take | (mul_ok & torch.isnan(best)), y, best)
        found_div_differs |= take
    usable = ~torch.isnan(best)
    usable[::bs] = False
    x = torch.where(usable, best, torch.zeros(()))
    x[::bs] = 3.0  # each block's absmax: scale = RN(3 / 127)
    assert usable.sum() > n // 2 and found_div_differs[usable].float().mean() > 0.2
    q, s = ops.quantize_int8(x.to(device), bs, True, seed, offset)
    assert torch.equal(s.cpu(), scale.expand(nb))
    want = torch.where(up, torch.ones(n), torch.zeros(n)).to(torch.int8)
    want[::bs] = 127
    assert torch.equal(q.cpu()[usable], want[usable])
    assert torch.equal(q.cpu()[::bs], want[::bs])
    assert torch.equal(quantize_ref(x, bs, True, seed, offset)[0], q.cpu())


def test_philox_reference_known_answers():
    # Random123's known-answer vector for philox4x32_10 at counter 0, key 0. The
    # C++ test checks the kernels' Philox against ATen's engine at other counters.
    idx = torch.arange(4, dtype=torch.int64)
    assert philox_words(0, idx).tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_cpu_philox_paths_agree(tmp_path):
    # On a CPU with AVX-512F the kernels draw Philox words with AVX-512;
    # DEEPSEEK_EXT_DISABLE_AVX512=1 (read once per process) forces the AVX2 path.
    # Both must give the reference's bits (elsewhere the two runs share a path).
    script = (
        "import sys, torch, deepseek_ext\n"
        "x = torch.randn(70001, generator=torch.Generator().manual_seed(0))\n"
        "outs = [deepseek_ext.ops.quantize_int8(x, bs, True, 2**40 + 9, off)[0] for bs, off in ((32, 3), (256, 2**33 + 1), (4096, 0))]\n"
        "torch.save(outs, sys.argv[1])\n"
    )
    avx2 = run_script(script, tmp_path / "avx2.pt", {"DEEPSEEK_EXT_DISABLE_AVX512": "1"})
    x = torch.randn(70001, generator=torch.Generator().manual_seed(0))
    for q2, (bs, off) in zip(avx2, ((32, 3), (256, 2**33 + 1), (4096, 0))):
        q_ref, _, _ = quantize_ref(x, bs, True, 2**40 + 9, off)
        assert_bitwise(q2, q_ref)
        assert_bitwise(ops.quantize_int8(x, bs, True, 2**40 + 9, off)[0], q_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 256, 4096])
def test_rne_error_is_at_most_half_a_step(device, dtype, block_size):
    x = rand(100003, dtype, device, seed=3)
    q, s = ops.quantize_int8(x, block_size)
    s_elem = s.double().repeat_interleave(block_size)[: x.numel()]
    err = (x.double() - q.double() * s_elem).abs()
    # x / scale is rounded once (relative 2^-24 of |x / scale| <= 127) before rint.
    bound = s_elem * (0.5 + 127 * 2.0**-24)
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_unbiased(device):
    # 256 values chosen to sit at many fractions of a step, each quantised
    # T = 4000 times with fresh random words (consecutive offsets of one stream).
    n, T, bs = 256, 4000, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).clamp(-2.9, 2.9)
    x[0] = 3.0  # absmax: scale = 3 / 127
    x = x.to(device)
    q, s = ops.quantize_int8(x.repeat(T), bs, stochastic=True, seed=1234, offset=0)
    scale = s[0].item()
    assert torch.equal(s, s[:1].expand_as(s))
    mean = q.view(T, n).double().mean(0) * scale
    # Per element: each draw is within one step, so its std is <= scale / 2 and
    # the std of the mean is <= scale / (2 sqrt(T)). Tolerance: 5 of those
    # (with this fixed seed the test is deterministic).
    tol = 5 * scale / (2 * math.sqrt(T))
    err = (mean - x.double()).abs()
    assert (err <= tol).all(), err.max() / tol
    # Over all n elements the mean error shrinks by a further sqrt(n).
    assert abs((mean - x.double()).mean().item()) <= 5 * scale / (2 * math.sqrt(T * n))
    # The same statistic catches round-to-nearest's bias on values that sit
    # between grid points (x = 0.3 step rounds to 0 every time).
    xb = torch.full((n,), 0.3 * scale, device=device)
    xb[0] = 127 * scale
    qn, sn = ops.quantize_int8(xb.repeat(T), bs)
    bias_rne = (qn.view(T, n)[:, 1:].double().mean(0) * sn[0].item() - xb[1:].double()).abs()
    assert (bias_rne > tol).all()
    qs, ss = ops.quantize_int8(xb.repeat(T), bs, stochastic=True, seed=99)
    bias_sr = (qs.view(T, n)[:, 1:].double().mean(0) * ss[0].item() - xb[1:].double()).abs()
    assert (bias_sr <= tol).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_is_reproducible_and_keyed_by_seed_and_offset(device, dtype):
    x = rand(10000, dtype, device, seed=5, scale=1e-3)
    a = ops.quantize_int8(x, 256, stochastic=True, seed=7, offset=100)
    b = ops.quantize_int8(x, 256, stochastic=True, seed=7, offset=100)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ops.quantize_int8(x, 256, stochastic=True, seed=8, offset=100)
    d = ops.quantize_int8(x, 256, stochastic=True, seed=7, offset=101)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    # Element i draws word offset + i: a suffix with offset + k gets the same q.
    k = 256 * 3
    e = ops.quantize_int8(x[k:], 256, stochastic=True, seed=7, offset=100 + k)
    assert torch.equal(e[0], a[0][k:]) and torch.equal(e[1], a[1][3:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_shapes_strides_and_empty(device, stochastic):
    x = torch.randn(37, 100, device=device)
    q, s = ops.quantize_int8(x.t(), 256, stochastic, 3, 0)  # non-contiguous: flattened in logical order
    q_ref, s_ref, _ = quantize_ref(x.t().contiguous(), 256, stochastic, 3, 0)
    assert q.shape == (100, 37)
    assert_bitwise(q, q_ref)
    assert_bitwise(s, s_ref)
    e = torch.empty(0, 5, device=device, dtype=torch.bfloat16)
    q, s = ops.quantize_int8(e, 64)
    assert q.shape == (0, 5) and q.dtype == torch.int8 and s.shape == (0,)
    d = ops.dequantize_int8(q, s, 64, torch.bfloat16)
    assert d.shape == (0, 5) and d.dtype == torch.bfloat16
    r = torch.empty(0, device=device)
    q, s = ops.quantize_int8_ef_(e.view(-1), r, 64)
    assert q.numel() == 0 and s.numel() == 0
    out = ops.dequantize_reduce_int8(torch.empty(3, 0, dtype=torch.int8, device=device),
                                     torch.empty(3, 0, device=device), 64, 1.0)
    assert out.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_blocks(device, dtype):
    x = rand(1000, dtype, device, seed=1)
    x[256:512] = 0
    x[768:] = 0  # the partial last block (768..999) all zero
    q, s = ops.quantize_int8(x, 256)
    assert s[1].item() == 0.0 and s[3].item() == 0.0 and (q[256:512] == 0).all() and (q[768:] == 0).all()
    d = ops.dequantize_int8(q, s, 256, dtype)
    assert (d[256:512] == 0).all() and not d.isnan().any()
    r = torch.full((1000,), 0.0, device=device)
    r[256:512] = 1e-44  # absmax / 127 underflows to 0: sent as zeros, carried in the residual
    r0 = r.clone()
    assert (r0[256:512] > 0).all()
    q2, s2 = ops.quantize_int8_ef_(x, r, 256)
    assert s2[1].item() == 0.0 and (q2[256:512] == 0).all()
    assert torch.equal(r[256:512], r0[256:512])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("stochastic", [False, True])
def test_nonfinite_blocks_dequantise_to_nan(device, dtype, value, stochastic):
    x = rand(1000, dtype, device, seed=2)
    x[300] = value  # block 1
    x[999] = value  # the partial last block
    q, s = ops.quantize_int8(x, 256, stochastic, 1, 0)
    assert s[1].isnan() and s[3].isnan() and not s[0].isnan() and not s[2].isnan()
    assert (q[256:512] == 0).all()
    d = ops.dequantize_int8(q, s, 256, dtype)
    assert d[256:512].isnan().all() and d[768:].isnan().all()
    assert not d[:256].isnan().any() and not d[512:768].isnan().any()
    red = ops.dequantize_reduce_int8(torch.stack([q, q]), torch.stack([s, s]), 256, 0.5, dtype)
    assert red[256:512].isnan().all() and not red[:256].isnan().any()
    # Error feedback: the bad blocks report NaN and keep their residual.
    r = torch.randn(1000, device=device) * 1e-3
    r0 = r.clone()
    q2, s2 = ops.quantize_int8_ef_(x, r, 256, stochastic, 1, 0)
    assert s2[1].isnan() and s2[3].isnan()
    assert torch.equal(r[256:512], r0[256:512]) and torch.equal(r[768:], r0[768:])
    assert not torch.equal(r[:256], r0[:256])


def test_largest_finite_values_quantise():
    for dtype in DTYPES:
        x = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max] + [1.0] * 30, dtype=dtype)
        q, s = ops.quantize_int8(x, 32)
        assert torch.isfinite(s).all() and q[0] == 127 and q[1] == -127


# ---------------------------------------------------------------- error feedback

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("n,block_size", [(1, 32), (1000, 96), (70001, 256), (9000, 4096)])
def test_ef_matches_reference(device, dtype, res_dtype, stochastic, n, block_size):
    x = rand(n, dtype, device, seed=n)
    r = (rand(n, torch.float32, device, seed=n + 1) * 0.01).to(res_dtype)
    assert_ef_matches_reference(x, r, block_size, stochastic, 5, 17)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_ef_zero_q_keeps_the_value_and_its_sign(device, stochastic):
    # q = 0 is the int8 0 (no sign), so the new residual of such an element is
    # y = x + r itself, bit for bit: -0 stays -0, tiny values stay.
    bs = 32
    x = torch.tensor([1.0, -0.0, 0.0, -1e-9, 1e-9, -0.0] + [0.5] * (bs - 6), device=device)
    r = torch.tensor([0.0, -0.0, -0.0, 0.0, -0.0, 0.0] + [0.0] * (bs - 6), device=device)
    y = x + r
    q, s = ops.quantize_int8_ef_(x, r, bs, stochastic, 3, 0)
    zero = q == 0
    assert zero[1:6].all()
    assert_bitwise(r[zero].view(torch.int32), y[zero].view(torch.int32))
    assert torch.signbit(r[1]) and not torch.signbit(r[2]) and not torch.signbit(r[5])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_ef_telescoping_invariant(device, res_dtype, stochastic):
    # sum_t dequant(q_t) = sum_t x_t - r_T, up to the roundings of y_t = x_t + r_{t-1}
    # (float32) and of r_t (float32, or bfloat16 for a bfloat16 residual).
    n, T, bs = 20000, 30, 256
    r = torch.zeros(n, dtype=res_dtype, device=device)
    sent = torch.zeros(n, dtype=torch.float64, device=device)
    truth = torch.zeros(n, dtype=torch.float64, device=device)
    bound = torch.zeros(n, dtype=torch.float64, device=device)
    eps_res = 2.0**-24 if res_dtype == torch.float32 else 2.0**-8  # half an ulp, relative
    for t in range(T):
        x = rand(n, torch.float32, device, seed=100 + t)
        y_abs = (x.double() + r.double()).abs()
        q, s = ops.quantize_int8_ef_(x, r, bs, stochastic, 11, t * n)
        sent += q.double() * s.double().repeat_interleave(bs)[:n]  # exact
        truth += x.double()
        bound += 1.01 * (y_abs * 2.0**-24 + r.double().abs() * eps_res) + 1e-45
    err = (sent - (truth - r.double())).abs()
    assert (err <= bound).all(), (err / bound).max()
    # And the residual stays within about one step of the last scale (no drift).
    assert (r.double().abs() <= s.double().repeat_interleave(bs)[:n] * 1.01).all()


# ---------------------------------------------------------------- dequantize

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("n,block_size", [(0, 32), (1, 32), (1000, 96), (70001, 256), (5000, 4096)])
def test_dequantize_matches_reference(device, out_dtype, n, block_size):
    x = rand(n, torch.float32, device, seed=n)
    q, s = ops.quantize_int8(x, block_size)
    d = ops.dequantize_int8(q, s, block_size, out_dtype)
    assert_bitwise(d, dequantize_ref(q, s, block_size, out_dtype))
    d2 = ops.dequantize_int8(q.view(1, -1) if n else q, s, block_size, out_dtype, n)
    assert d2.shape == (q.view(1, -1) if n else q).shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("W", [1, 3, 8])
@pytest.mark.parametrize("n,block_size", [(1, 32), (1000, 96), (70001, 256), (4103, 4096)])
def test_dequantize_reduce_vs_float64(device, out_dtype, W, n, block_size):
    xs = [rand(n, torch.float32, device, seed=10 * w + n) for w in range(W)]
    qs, ss = zip(*(ops.quantize_int8(x, block_size) for x in xs))
    q, s = torch.stack(qs), torch.stack(ss)
    mult = 1.0 / W
    out = ops.dequantize_reduce_int8(q, s, block_size, mult, out_dtype)
    ref = dequantize_reduce_ref64(q, s, block_size, mult)
    assert out.shape == (n,) and out.dtype == out_dtype
    # float32 accumulation: W + 1 roundings of at most half an ulp of the
    # partial sums (bounded by sum |terms|); then the output dtype's rounding.
    terms = mult * (q.double().abs() * s.double().repeat_interleave(block_size, dim=1)[:, :n]).sum(0)
    fi = torch.finfo(out_dtype)
    # (the last term: half the spacing of the output dtype's subnormals)
    tol = (W + 1) * 2.0**-24 * terms + fi.eps / 2 * ref.abs() + fi.smallest_normal * fi.eps / 2
    assert ((out.double() - ref).abs() <= tol).all()
    if W == 1:
        # dequantize_reduce with W = 1, multiplier 1 is dequantize, bit for bit.
        one = ops.dequantize_reduce_int8(q, s, block_size, 1.0, out_dtype)
        assert_bitwise(one, dequantize_ref(q[0], s[0], block_size, out_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_reduce_non_contiguous(device):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (700, 4), dtype=torch.int8, generator=g).to(device).t()  # [4, 700]
    s = torch.rand(3, 4, generator=g).to(device).t()  # [4, 3]
    out = ops.dequantize_reduce_int8(q, s, 256, 0.25)
    assert_bitwise(out, ops.dequantize_reduce_int8(q.contiguous(), s.contiguous(), 256, 0.25))
    ref = dequantize_reduce_ref64(q, s, 256, 0.25)
    terms = 0.25 * (q.double().abs() * s.double().repeat_interleave(256, dim=1)[:, :700]).sum(0)
    assert ((out.double() - ref).abs() <= 5 * 2.0**-24 * terms + 2.0**-24 * ref.abs()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ef_non_contiguous_residual(device):
    x = torch.randn(64, 50, device=device)
    r_base = torch.randn(50, 64, device=device) * 1e-3
    r = r_base.t()  # non-contiguous, x's shape
    r_flat = r.contiguous()
    q_ref, s_ref, r_ref = quantize_ref(x, 256, residual=r_flat)
    q, s = ops.quantize_int8_ef_(x, r, 256)
    assert_bitwise(q, q_ref)
    assert_bitwise(s, s_ref)
    assert_bitwise(r.contiguous(), r_ref)
    assert_bitwise(r_base.t(), r_ref)  # written through the view


# ---------------------------------------------------------------- PyTorch integration

def sample_inputs(device):
    x = torch.randn(1000, device=device)
    q, s = QUANT(x, 256, False, 0, 0)
    yield QUANT, (x, 256, False, 0, 0)
    yield QUANT, (x.to(torch.bfloat16).view(10, 100), 96, True, 3, 5)
    yield QUANT, (torch.empty(0, device=device), 32, False, 0, 0)
    yield QUANT_EF, (x, torch.zeros(1000, device=device), 256, True, 1, 0)
    yield QUANT_EF, (x.half(), torch.zeros(1000, device=device, dtype=torch.bfloat16), 128, False, 0, 0)
    yield DEQUANT, (q, s, 256, torch.float32, 1000)
    yield DEQUANT, (q, s, 256, torch.bfloat16, 1000)
    yield REDUCE, (torch.stack([q, q, q]), torch.stack([s, s, s]), 256, 1.0 / 3, torch.float32)
    yield REDUCE, (torch.stack([q]), torch.stack([s]), 256, 2.0, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in sample_inputs(device):
        opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def step(x, r, w):
        q, s = ops.quantize_int8_ef_(x * 2, r, 256, True, 7, 0)
        q2, s2 = ops.quantize_int8(x, 128)
        d = ops.dequantize_int8(q2, s2, 128, torch.float32)
        red = ops.dequantize_reduce_int8(torch.stack([q, q]), torch.stack([s, s]), 256, w, torch.float32)
        return red, d

    x = torch.randn(3000, device=device)
    r1 = torch.randn(3000, device=device) * 1e-3
    r2 = r1.clone()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out = compiled(x, r1, 0.5)
    expected = step(x, r2, 0.5)
    assert_bitwise(out[0], expected[0])
    assert_bitwise(out[1], expected[1])
    assert_bitwise(r1, r2)


def test_bad_inputs_name_the_argument():
    x = torch.randn(100)
    q, s = ops.quantize_int8(x, 32)
    cases = [
        (lambda: ops.quantize_int8(x, 48), r"block_size must be a positive multiple of 32 up to 4096, got 48"),
        (lambda: ops.quantize_int8(x, 0), r"block_size must be a positive multiple of 32 up to 4096, got 0"),
        (lambda: ops.quantize_int8(x, 8192), r"block_size .* got 8192"),
        (lambda: ops.quantize_int8(x.double()), r"x must be float32, float16 or bfloat16, got Double"),
        (lambda: ops.quantize_int8(x, 32, True, 0, -1), r"offset must be >= 0, got -1"),
        (lambda: ops.quantize_int8_ef_(x, torch.zeros(99)), r"residual must have as many elements as x \(100\), got 99"),
        (lambda: ops.quantize_int8_ef_(x, torch.zeros(100).half()), r"residual must be float32 or bfloat16, got Half"),
        (lambda: ops.dequantize_int8(q.int(), s, 32), r"q must be an int8 tensor, got Int"),
        (lambda: ops.dequantize_int8(q, s.double(), 32), r"scales must be a float32 tensor, got Double"),
        (lambda: ops.dequantize_int8(q, s, 64), r"scales must be a 1-D tensor of ceil\(numel / block_size\) = 2 elements"),
        (lambda: ops.dequantize_int8(q, s, 32, torch.float32, 99), r"q must have numel = 99 elements, got 100"),
        (lambda: ops.dequantize_int8(q, s, 32, torch.int32), r"dtype must be float32, float16 or bfloat16, got Int"),
        (lambda: ops.dequantize_reduce_int8(q, s, 32), r"q must be a 2-D tensor \[world_size, n\]"),
        (lambda: ops.dequantize_reduce_int8(q.view(1, -1), s.view(1, -1)[:, :3], 32), r"scales must have shape \[1, 4\]"),
        (lambda: ops.dequantize_reduce_int8(torch.stack([q, q]), s.view(1, -1), 32), r"scales must have shape \[2, 4\]"),
        (lambda: ops.dequantize_reduce_int8(q.view(1, -1), s.view(1, -1), 31), r"block_size must be a positive multiple of 32"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


def test_bad_inputs_on_meta():
    with pytest.raises(RuntimeError, match=r"block_size must be a positive multiple of 32"):
        QUANT(torch.empty(10, device="meta"), 40, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"residual must be float32 or bfloat16"):
        QUANT_EF(torch.empty(10, device="meta"), torch.empty(10, device="meta", dtype=torch.half), 32, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"scales must be a 1-D tensor"):
        DEQUANT(torch.empty(10, dtype=torch.int8, device="meta"), torch.empty(2, device="meta"), 32, torch.float32, 10)
    q, s = QUANT(torch.empty(7, 300, device="meta"), 256, False, 0, 0)
    assert q.shape == (7, 300) and q.dtype == torch.int8 and s.shape == (9,)
    out = REDUCE(torch.empty(4, 300, dtype=torch.int8, device="meta"), torch.empty(4, 2, device="meta"), 256, 1.0, torch.bfloat16)
    assert out.shape == (300,) and out.dtype == torch.bfloat16


def test_cpp_api_and_torchscript():
    @torch.jit.script
    def f(x: torch.Tensor, r: torch.Tensor):
        q, s = torch.ops.deepseek_ext.quantize_int8_ef_(x, r, 64, False, 0, 0)
        return torch.ops.deepseek_ext.dequantize_int8(q, s, 64, torch.float32, x.numel())

    x = torch.randn(500)
    r = torch.zeros(500)
    d = f(x, r)
    q, s, r_ref = quantize_ref(x, 64, residual=torch.zeros(500))
    assert_bitwise(d, dequantize_ref(q, s, 64))
    assert_bitwise(r, r_ref)


# ---------------------------------------------------------------- large CPU outputs

def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _anon_huge_kib(addr):
    """AnonHugePages of the mapping of this process that holds addr."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) > 1 and len(head[1]) == 4:  # a mapping's first line
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and head and head[0] == "AnonHugePages:":
                return int(head[1])
    return 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"),
                    reason="needs Linux transparent huge pages in 'always' or 'madvise' mode")
def test_large_cpu_outputs_get_huge_pages_and_exact_values():
    """Outputs of 16 MiB or more are advised to use 2 MiB pages before the kernel
    writes them (csrc/ops/common/cpu_alloc.h): the values stay exact, and the
    mapping of a 36 MiB output (above glibc's 32 MiB mmap threshold: always
    fresh pages) holds huge pages."""
    n = 9 * 2**20 + 4096  # float32 output: 36 MiB
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=gen)
    q, s = ops.quantize_int8(x, 256)
    out = ops.dequantize_int8(q, s, 256, torch.float32)
    assert_bitwise(out, dequantize_ref(q, s, 256))
    assert _anon_huge_kib(out.data_ptr() + out.nbytes // 2) >= 2048
    # An int8 q of 17 MiB is advised too. Below glibc's largest mmap threshold
    # (32 MiB) it may come from already-touched heap pages, which keep their
    # 4 KiB pages (and fault no more), so only its values are checked.
    x_big = torch.randn(17 * 2**20, generator=gen)
    q_big, s_big = ops.quantize_int8(x_big, 4096)
    q_ref, s_ref, _ = quantize_ref(x_big, 4096)
    assert_bitwise(q_big, q_ref)
    assert_bitwise(s_big, s_ref)


# ---------------------------------------------------------------- CPU == CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("n,block_size,offset", [(1, 32, 0), (4103, 96, 3), (1_000_003, 256, 2**33 + 1), (70001, 4096, 5)])
def test_cuda_matches_cpu_bitwise(dtype, stochastic, n, block_size, offset):
    x = rand(n, dtype, "cpu", seed=n)
    x[n // 2] = float("nan") if n > 1 else x[0]
    q_c, s_c = ops.quantize_int8(x, block_size, stochastic, 2**35 + 9, offset)
    q_g, s_g = ops.quantize_int8(x.cuda(), block_size, stochastic, 2**35 + 9, offset)
    assert_bitwise(q_g.cpu(), q_c)
    assert_bitwise(s_g.cpu(), s_c)
    for res_dtype in (torch.float32, torch.bfloat16):
        r_c = (rand(n, torch.float32, "cpu", seed=n + 1) * 1e-2).to(res_dtype)
        r_g = r_c.cuda()
        a = ops.quantize_int8_ef_(x, r_c, block_size, stochastic, 3, offset)
        b = ops.quantize_int8_ef_(x.cuda(), r_g, block_size, stochastic, 3, offset)
        assert_bitwise(b[0].cpu(), a[0])
        assert_bitwise(b[1].cpu(), a[1])
        assert_bitwise(r_g.cpu(), r_c)
    for out_dtype in DTYPES:
        assert_bitwise(ops.dequantize_int8(q_g, s_g, block_size, out_dtype).cpu(),
                       ops.dequantize_int8(q_c, s_c, block_size, out_dtype))
        q2 = torch.stack([q_c, q_c.flip(0), q_c])
        s2 = torch.stack([s_c, s_c.flip(0), s_c])
        assert_bitwise(ops.dequantize_reduce_int8(q2.cuda(), s2.cuda(), block_size, 0.3, out_dtype).cpu(),
                       ops.dequantize_reduce_int8(q2, s2, block_size, 0.3, out_dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_quantize_division_paths_match_cpu_bitwise(dtype, stochastic):
    """The CUDA kernel's round-to-nearest divides through one reciprocal per
    thread where the scale allows it and by a division per value elsewhere
    (stochastic rounding multiplies by the reciprocal, int8q::sr_quotient).
    Both keep q, scales and the residual equal to the CPU's, for blocks across
    the whole exponent range (also outside 2^-90..2^90, where the kernel always
    divides, stochastic rounding too), zeros of both signs, subnormals, tiny
    quotients and near-ties."""
    n, bs = 1_000_003, 256
    gen = torch.Generator().manual_seed(11)
    x = exponent_range_input(n, bs, dtype, gen)
    kw = dict(stochastic=stochastic, seed=5, offset=3)
    q_c, s_c = ops.quantize_int8(x, bs, **kw)
    q_g, s_g = ops.quantize_int8(x.cuda(), bs, **kw)
    assert_bitwise(q_g.cpu(), q_c)
    assert_bitwise(s_g.cpu(), s_c)
    r_c = torch.randn(n, generator=gen) * 1e-3
    r_c[:bs] = -0.0  # x + r keeps the zeros' signs
    r_c[bs:4 * bs] = 0.0  # the subnormal and tiny blocks stay as they are
    r_g = r_c.cuda()
    a = ops.quantize_int8_ef_(x, r_c, bs, **kw)
    b = ops.quantize_int8_ef_(x.cuda(), r_g, bs, **kw)
    assert_bitwise(b[0].cpu(), a[0])
    assert_bitwise(r_g.cpu(), r_c)


@pytest.mark.cuda
def test_cuda_misaligned_views():
    base = torch.randn(10001, device="cuda")
    x = base[1:]  # 4-byte offset: no 16-byte loads
    q, s = ops.quantize_int8(x, 256, True, 1, 0)
    q_ref, s_ref, _ = quantize_ref(x.cpu(), 256, True, 1, 0)
    assert_bitwise(q.cpu(), q_ref)
    assert_bitwise(s.cpu(), s_ref)
    rb = torch.zeros(10001, device="cuda")
    r = rb[1:]
    q2, s2 = ops.quantize_int8_ef_(base[:-1], r, 256)
    q_ref, s_ref, r_ref = quantize_ref(base[:-1].cpu(), 256, residual=torch.zeros(10000))
    assert_bitwise(r.cpu(), r_ref)


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match=r"residual must be on the same device as x"):
        ops.quantize_int8_ef_(torch.ones(3, device="cuda"), torch.zeros(3))
    q, s = ops.quantize_int8(torch.ones(64, device="cuda"), 32)
    with pytest.raises(RuntimeError, match=r"scales must be on the same device as q"):
        ops.dequantize_int8(q, s.cpu(), 32)
