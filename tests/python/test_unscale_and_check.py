"""unscale_and_check_ against torch._amp_foreach_non_finite_check_and_unscale_."""

import random

import pytest
import torch
from torch.library import opcheck

import deepseek_ext
from utils import DEVICES

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OP = torch.ops.deepseek_ext.unscale_and_check_.default
# float32 bits of a signalling NaN: any arithmetic on it yields a quiet NaN, so
# its bits survive only if the op never writes the tensor.
SIGNALLING_NAN_BITS = 0x7F800001


def random_grads(device, seed, count=12, inject=0):
    """A list of gradients with odd shapes and mixed dtypes; `inject` inf/NaN values
    are planted at random positions, first and last elements included."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(count):
        rank = rng.choice([1, 2, 3])
        shape = [rng.choice([1, 3, 7, 31, 64, 129, 1000]) for _ in range(rank)]
        if rng.random() < 0.15:
            shape = [rng.choice([65537, 200003])]  # spans several work items / chunks
        dtype = rng.choice(DTYPES)
        grads.append((torch.randn(shape, generator=gen) * 100).to(dtype).to(device))
    for k in range(inject):
        g = rng.choice(grads).view(-1)
        pos = [0, g.numel() - 1, rng.randrange(g.numel())][k % 3]
        g[pos] = rng.choice([float("inf"), float("-inf"), float("nan")])
    return grads


def reference(grads, found_inf, inv_scale):
    """torch's own kernel on copies. Its CUDA kernel rejects bfloat16, so bfloat16 tensors on a
    GPU go through its CPU kernel (the same float32 multiply and rounding) and come back."""
    grads = [g.clone() for g in grads]
    found = found_inf.clone()
    on_cpu = [k for k, g in enumerate(grads) if g.is_cuda and g.dtype == torch.bfloat16]
    rest = [g for k, g in enumerate(grads) if k not in on_cpu]
    if rest:
        torch._amp_foreach_non_finite_check_and_unscale_(rest, found, inv_scale)
    if on_cpu:
        moved = [grads[k].cpu() for k in on_cpu]
        found_cpu = found.cpu()
        torch._amp_foreach_non_finite_check_and_unscale_(moved, found_cpu, inv_scale.cpu())
        for k, g in zip(on_cpu, moved):
            grads[k] = g.to(grads[k].device)
        found = found_cpu.to(found.device)
    return grads, found


def assert_bitwise_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


def sample_inputs(device):
    yield random_grads(device, 0), torch.zeros(1, device=device), torch.full((1,), 0.25, device=device)
    yield random_grads(device, 1, inject=2), torch.zeros(1, device=device), torch.full((1,), 3.0, device=device)
    yield random_grads(device, 2), torch.zeros(1, device=device), torch.ones(1, device=device)
    yield [], torch.zeros(1, device=device), torch.full((1,), 0.5, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("inv_scale", [2.0**-16, 0.37, 1.0, 3.0])
def test_matches_torch(device, seed, inv_scale):
    grads = random_grads(device, seed, inject=seed % 4)
    found = torch.zeros(1, device=device)
    s = torch.full((1,), inv_scale, device=device)
    expected, expected_found = reference(grads, found, s)
    deepseek_ext.ops.unscale_and_check_(grads, found, s)
    assert_bitwise_equal(grads, expected)
    assert found.item() == expected_found.item() == (1.0 if seed % 4 else 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_every_nonfinite_position_is_caught(device, dtype, value, where):
    g = torch.randn(70001, device=device).to(dtype)
    pos = {"first": 0, "last": g.numel() - 1, "middle": 40000}[where]
    g[pos] = value
    for s in (1.0, 0.5):  # check-only and unscale paths
        found = torch.zeros(1, device=device)
        deepseek_ext.ops.unscale_and_check_([g], found, torch.full((1,), s, device=device))
        assert found.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_largest_finite_values_are_not_flagged(device):
    grads = [torch.tensor([torch.finfo(d).max, -torch.finfo(d).max, torch.finfo(d).tiny], dtype=d, device=device)
             for d in DTYPES]
    found = torch.zeros(1, device=device)
    deepseek_ext.ops.unscale_and_check_(grads, found, torch.ones(1, device=device))
    assert found.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_is_never_cleared(device):
    found = torch.ones(1, device=device)
    deepseek_ext.ops.unscale_and_check_([torch.ones(10, device=device)], found, torch.full((1,), 0.5, device=device))
    assert found.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_inv_scale_one_only_reads(device):
    g = torch.randn(100000, device=device)
    g.view(torch.int32)[[0, 777, 99999]] = SIGNALLING_NAN_BITS
    found = torch.zeros(1, device=device)
    deepseek_ext.ops.unscale_and_check_([g], found, torch.ones(1, device=device))
    assert found.item() == 1.0
    assert (g.view(torch.int32)[[0, 777, 99999]] == SIGNALLING_NAN_BITS).all(), "the tensor was written"
    # Any other scale writes, and the NaN comes back quiet.
    deepseek_ext.ops.unscale_and_check_([g], found, torch.full((1,), 0.5, device=device))
    assert (g.view(torch.int32)[[0, 777, 99999]] != SIGNALLING_NAN_BITS).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views(device, dtype):
    base = torch.randn(64, 130, device=device).to(dtype)
    views = [base.t(), base[:, ::2], base[3:40, 5:77], base.view(64, 13, 10).permute(2, 0, 1)]
    for v in views:
        b2 = base.clone()
        expected = [v.clone()]
        expected, _ = reference(expected, torch.zeros(1, device=device), torch.full((1,), 0.125, device=device))
        found = torch.zeros(1, device=device)
        deepseek_ext.ops.unscale_and_check_([v], found, torch.full((1,), 0.125, device=device))
        assert_bitwise_equal([v], expected)
        # Only the view's elements changed.
        mask = torch.zeros_like(base, dtype=torch.bool)
        mask_view = {id(views[0]): mask.t(), id(views[1]): mask[:, ::2], id(views[2]): mask[3:40, 5:77],
                     id(views[3]): mask.view(64, 13, 10).permute(2, 0, 1)}[id(v)]
        mask_view.fill_(True)
        assert torch.equal(base[~mask], b2[~mask])
        base.copy_(b2 * 1)  # restore for the next view (same values)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_list_and_empty_tensors(device):
    found = torch.zeros(1, device=device)
    s = torch.full((1,), 0.5, device=device)
    deepseek_ext.ops.unscale_and_check_([], found, s)
    empties = [torch.empty(0, device=device), torch.empty(3, 0, dtype=torch.float16, device=device)]
    deepseek_ext.ops.unscale_and_check_(empties + [torch.full((4,), 2.0, device=device)], found, s)
    assert found.item() == 0.0


def test_bad_inputs_name_the_argument():
    ok = torch.ones(4)
    found, s = torch.zeros(1), torch.ones(1)
    cases = [
        (([ok, torch.ones(3, dtype=torch.int32)], found, s), r"grads\[1\] must be float32, float16 or bfloat16, got Int"),
        (([ok], torch.zeros(1, dtype=torch.float64), s), r"found_inf must be a float32 tensor, got Double"),
        (([ok], torch.zeros(2), s), r"found_inf must have exactly one element, got 2"),
        (([ok], found, torch.ones(1, dtype=torch.float16)), r"inv_scale must be a float32 tensor"),
        (([ok], found, torch.ones(3)), r"inv_scale must have exactly one element, got 3"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            deepseek_ext.ops.unscale_and_check_(*args)
    with pytest.raises(ValueError, match=r"grads\[1\] must be a strided \(dense\) tensor"):
        deepseek_ext.ops.unscale_and_check_([ok, torch.ones(2, 2).to_sparse()], found, s)
    # Nothing was written by the failed calls.
    assert torch.equal(ok, torch.ones(4)) and found.item() == 0.0


def test_bad_inputs_on_meta_and_fake():
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be float32, float16 or bfloat16"):
        OP([torch.ones(3, dtype=torch.int64, device="meta")], torch.zeros(1, device="meta"), torch.ones(1, device="meta"))


@pytest.mark.parametrize("device", DEVICES)
def test_meta_tensors(device):
    grads = [torch.empty(5, 7, device="meta"), torch.empty(3, dtype=torch.bfloat16, device="meta")]
    OP(grads, torch.empty(1, device="meta"), torch.empty(1, device="meta"))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in sample_inputs(device):
        opcheck(OP, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def step(grads, found, s):
        deepseek_ext.ops.unscale_and_check_(grads, found, s)
        return found * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    grads = random_grads(device, 3, count=5, inject=1)
    expected, expected_found = reference(grads, torch.zeros(1, device=device), torch.full((1,), 0.5, device=device))
    found = torch.zeros(1, device=device)
    out = compiled(grads, found, torch.full((1,), 0.5, device=device))
    assert_bitwise_equal(grads, expected)
    assert found.item() == expected_found.item() == 1.0 and out.item() == 2.0


def test_torchscript():
    @torch.jit.script
    def step(grads: list[torch.Tensor], found: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        torch.ops.deepseek_ext.unscale_and_check_(grads, found, s)
        return found

    grads = random_grads("cpu", 4, count=4, inject=1)
    expected, expected_found = reference(grads, torch.zeros(1), torch.full((1,), 0.5))
    found = step(grads, torch.zeros(1), torch.full((1,), 0.5))
    assert_bitwise_equal(grads, expected)
    assert found.item() == expected_found.item()


@pytest.mark.cuda
def test_cuda_matches_cpu_bitwise():
    grads = random_grads("cpu", 11, count=40, inject=3)
    cuda_grads = [g.cuda() for g in grads]
    found_cpu, found_cuda = torch.zeros(1), torch.zeros(1, device="cuda")
    deepseek_ext.ops.unscale_and_check_(grads, found_cpu, torch.full((1,), 0.3))
    deepseek_ext.ops.unscale_and_check_(cuda_grads, found_cuda, torch.full((1,), 0.3, device="cuda"))
    assert_bitwise_equal([g.cpu() for g in cuda_grads], grads)
    assert found_cuda.item() == found_cpu.item() == 1.0


@pytest.mark.cuda
def test_cuda_long_list_and_misaligned_views():
    # More tensors than one launch takes, and views whose data is not 16-byte aligned.
    base = torch.randn(500 * 97, device="cuda")
    grads = [base[i * 97 + 1:(i + 1) * 97] for i in range(500)]
    grads[-1][-1] = float("nan")
    expected, _ = reference(grads, torch.zeros(1, device="cuda"), torch.full((1,), 0.5, device="cuda"))
    found = torch.zeros(1, device="cuda")
    deepseek_ext.ops.unscale_and_check_(grads, found, torch.full((1,), 0.5, device="cuda"))
    assert_bitwise_equal(grads, expected)
    assert found.item() == 1.0


def test_rejects_mixed_devices_before_dispatch():
    # A tensor of another device in the list is named before the op is dispatched (a CPU tensor
    # in a CUDA list crashed the process on an H200 when it reached the dispatcher).
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be on the same device as found_inf \(cpu\), got meta"):
        deepseek_ext.ops.unscale_and_check_([torch.ones(3), torch.ones(3, device="meta")], torch.zeros(1),
                                            torch.ones(1))


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be on the same device as found_inf"):
        deepseek_ext.ops.unscale_and_check_(
            [torch.ones(3, device="cuda"), torch.ones(3)], torch.zeros(1, device="cuda"), torch.ones(1, device="cuda")
        )
