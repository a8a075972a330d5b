"""DynamicLossScaler as a drop-in for torch.amp.GradScaler, side by side with
GradScaler("cpu"): same surface, same scale sequence, same skipped steps, same
weights."""

import copy
import io
import pickle
import random
import warnings

import pytest
import torch

from deepseek_ext.amp import DynamicLossScaler
from utils import HAS_CUDA

# Bounds out of reach and hysteresis 1: GradScaler's rule exactly.
WIDE = dict(min_scale=2.0**-60, max_scale=2.0**100)

FACTORS = [(2.0, 0.5), (3.0, 0.8), (1.5, 0.25), (4.0, 0.3)]


def pair(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3, **ours):
    kw = dict(init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
              growth_interval=growth_interval)
    return DynamicLossScaler("cpu", **kw, **{**WIDE, **ours}), torch.amp.GradScaler("cpu", **kw)


def one_step(scaler, p, overflow, opt=None):
    """One scale/backward/step/update on loss = sum(p * c); c holds an inf when
    `overflow` (so p.grad does)."""
    opt = opt or torch.optim.SGD([p], lr=0.0)
    c = torch.arange(1.0, p.numel() + 1).view_as(p)
    if overflow:
        c[0] = float("inf")
    scaler.scale((p * c).sum()).backward()
    scaler.step(opt)
    scaler.update()
    p.grad = None


def overflow_pattern(seed, n, p_overflow=0.3):
    rng = random.Random(seed)
    return [rng.random() < p_overflow for _ in range(n)]


def test_is_a_gradscaler_with_its_public_and_state_dict_surface():
    ours, theirs = DynamicLossScaler("cpu"), torch.amp.GradScaler("cpu")
    assert isinstance(ours, torch.amp.GradScaler)
    public = [n for n in dir(torch.amp.GradScaler) if not n.startswith("_")]
    assert {"scale", "unscale_", "step", "update", "get_scale", "set_growth_factor", "set_backoff_factor",
            "set_growth_interval", "state_dict", "load_state_dict"} <= set(public)
    for name in public:
        assert callable(getattr(ours, name)), name
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    one_step(ours, p, False)
    one_step(theirs, q, False)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert set(sd_theirs) <= set(sd_ours)
    assert {k: sd_ours[k] for k in sd_theirs} == sd_theirs
    # Each loads the other's checkpoint.
    other = torch.amp.GradScaler("cpu")
    other.load_state_dict(sd_ours)
    assert other.state_dict() == sd_theirs
    mine = DynamicLossScaler("cpu")
    mine.load_state_dict(sd_theirs)
    assert {k: mine.state_dict()[k] for k in sd_theirs} == sd_theirs


@pytest.mark.parametrize("growth_factor,backoff_factor", FACTORS)
@pytest.mark.parametrize("init_scale", [2.0**10, 1000.0])
def test_scale_sequence_and_skips_match_gradscaler(growth_factor, backoff_factor, init_scale):
    ours, theirs = pair(init_scale, growth_factor, backoff_factor, growth_interval=3)
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    skips = 0
    for i, overflow in enumerate(overflow_pattern(int(growth_factor * 10), 120)):
        one_step(ours, p, overflow)
        one_step(theirs, q, overflow)
        skips += overflow
        assert ours.get_scale() == theirs.get_scale(), i
        assert ours._get_growth_tracker() == theirs._get_growth_tracker(), i
    assert int(ours.skipped_steps) == skips


def test_default_scaler_keeps_the_exact_power_of_two_kernel(monkeypatch):
    import deepseek_ext.amp as amp
    calls = []
    real = amp.ops.update_scale_
    monkeypatch.setattr(amp.ops, "update_scale_", lambda *a: (calls.append(1), real(*a))[1])
    p = torch.nn.Parameter(torch.ones(2))
    one_step(DynamicLossScaler("cpu"), p, False)
    assert calls == [1]
    one_step(DynamicLossScaler("cpu", growth_factor=3.0), p, False)
    assert calls == [1]  # GradScaler's rule in device ops instead


@pytest.mark.parametrize("hysteresis", [1, 3])
def test_any_factor_rule_equals_the_power_of_two_kernel_on_powers_of_two(hysteresis):
    # update(tensor) leaves the scale's value unknown on the host: the scaler
    # then takes the general rule, which must give update_scale_'s results.
    kw = dict(init_scale=2.0**6, growth_factor=4.0, backoff_factor=0.25, growth_interval=2, hysteresis=hysteresis,
              min_scale=2.0**-2, max_scale=2.0**12)
    fast, general = DynamicLossScaler("cpu", **kw), DynamicLossScaler("cpu", **kw)
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    one_step(fast, p, False)
    fast.scale(torch.ones(()))
    fast.update(2.0**6)
    general.scale(torch.ones(()))
    general.update(torch.tensor(2.0**6))
    one_step(general, q, False)
    for i, overflow in enumerate(overflow_pattern(hysteresis, 200, 0.45)):
        one_step(fast, p, overflow)
        one_step(general, q, overflow)
        assert fast.state_dict() == general.state_dict(), i
    assert fast._scale_is_pow2 and not general._scale_is_pow2  # each kept its route


@pytest.mark.parametrize("opt_kind", ["SGD", "AdamW", "AdamW-fused", "SGD-fused"])
@pytest.mark.parametrize("growth_factor,backoff_factor", [(2.0, 0.5), (3.0, 0.8)])
def test_training_side_by_side_bit_identical(opt_kind, growth_factor, backoff_factor):
    """fp16 autocast training of a torch.nn model: same weights after every step,
    same skipped steps, same scales (NaNs planted in some steps)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    models = [copy.deepcopy(ref), copy.deepcopy(ref)]
    name, fused = opt_kind.split("-")[0], opt_kind.endswith("fused")
    opts = [getattr(torch.optim, name)(m.parameters(), lr=1e-2, fused=fused) for m in models]
    scalers = pair(2.0**12, growth_factor, backoff_factor, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    for i, overflow in enumerate(overflow_pattern(7, 30)):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
        if overflow:
            x[3, 2] = float("inf")
        for m, o, s in zip(models, opts, scalers):
            with torch.autocast("cpu", dtype=torch.float16):
                out = m(x)
            s.scale(torch.nn.functional.mse_loss(out.float(), y)).backward()
            s.step(o)
            s.update()
            o.zero_grad(set_to_none=True)
        assert scalers[0].get_scale() == scalers[1].get_scale(), i
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b), i
    assert int(scalers[0].skipped_steps) == sum(overflow_pattern(7, 30))


def test_set_growth_factor_backoff_factor_growth_interval_like_gradscaler():
    ours, theirs = pair(2.0**8, growth_interval=4)
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    pattern = overflow_pattern(3, 60)
    for i, overflow in enumerate(pattern):
        if i == 20:
            for s in (ours, theirs):
                s.set_growth_factor(3.0)
                s.set_backoff_factor(0.75)
                s.set_growth_interval(2)
        one_step(ours, p, overflow)
        one_step(theirs, q, overflow)
        assert ours.get_scale() == theirs.get_scale(), i
    assert (ours.get_growth_factor(), ours.get_backoff_factor(), ours.get_growth_interval()) == (3.0, 0.75, 2)
    sd = ours.state_dict()
    assert (sd["growth_factor"], sd["backoff_factor"], sd["growth_interval"]) == (3.0, 0.75, 2)
    with pytest.raises(ValueError, match="new_factor must be a finite number > 1"):
        ours.set_growth_factor(1.0)
    with pytest.raises(ValueError, match=r"new_factor must be a number in \(0, 1\)"):
        ours.set_backoff_factor(1.0)
    with pytest.raises(ValueError, match="new_interval must be a positive int"):
        ours.set_growth_interval(0)


def test_gradscaler_checkpoint_with_other_factors_loads_and_continues():
    theirs = torch.amp.GradScaler("cpu", init_scale=1000.0, growth_factor=3.0, backoff_factor=0.8,
                                  growth_interval=2)
    q = torch.nn.Parameter(torch.ones(2))
    pattern = overflow_pattern(11, 40)
    for overflow in pattern[:15]:
        one_step(theirs, q, overflow)
    ours = DynamicLossScaler("cpu", **WIDE)
    ours.load_state_dict(theirs.state_dict())  # before its first scale()
    p = torch.nn.Parameter(torch.ones(2))
    for i, overflow in enumerate(pattern[15:]):
        one_step(ours, p, overflow)
        one_step(theirs, q, overflow)
        assert ours.get_scale() == theirs.get_scale(), i


def test_update_new_scale_follows_gradscaler():
    ours, theirs = pair(2.0**8, growth_factor=2.0, growth_interval=2)
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    pattern = overflow_pattern(5, 30)
    for i, overflow in enumerate(pattern):
        for s, t in ((ours, p), (theirs, q)):
            if i == 5:
                s.scale(torch.ones(()))
                s.update(torch.tensor(3.0))  # not a power of two
            elif i == 17:
                s.scale(torch.ones(()))
                s.update(1000.0)
            one_step(s, t, overflow)
        assert ours.get_scale() == theirs.get_scale(), i
    for bad in (torch.ones(2), torch.ones(1, requires_grad=True), torch.ones(1, device="meta")):
        ours.scale(torch.ones(()))
        with pytest.raises(ValueError, match="new_scale must be a float or a one-element tensor"):
            ours.update(bad)
    with pytest.raises(ValueError, match="new_scale must be a finite number > 0"):
        ours.update(float("inf"))
    ours.update(2.0**200)
    assert ours.get_scale() == WIDE["max_scale"]  # ours keeps its bounds


@pytest.mark.parametrize("opt_name", ["SGD", "SparseAdam"])
def test_sparse_gradients_are_unscaled_like_gradscaler(opt_name):
    torch.manual_seed(0)
    embs = [torch.nn.Embedding(10, 4, sparse=True) for _ in range(2)]
    embs[1].load_state_dict(embs[0].state_dict())
    opts = [getattr(torch.optim, opt_name)(e.parameters(), lr=0.1) for e in embs]
    scalers = pair(2.0**8, growth_interval=2)
    for i, overflow in enumerate(overflow_pattern(2, 12)):
        idx = torch.tensor([1, 3, 3, 7])  # 3 twice: an uncoalesced gradient
        for e, o, s in zip(embs, opts, scalers):
            w = torch.ones(4, 1)
            if overflow:
                w[2] = float("inf")
            s.scale((e(idx) * w).sum()).backward()
            s.step(o)
            s.update()
            o.zero_grad(set_to_none=True)
        assert scalers[0].get_scale() == scalers[1].get_scale(), i
        assert torch.equal(embs[0].weight, embs[1].weight), i
    assert not torch.equal(embs[0].weight, torch.nn.Embedding(10, 4).weight)  # it trained


def test_float16_sparse_gradient_is_coalesced_before_the_check():
    # Two scaled float16 values under one index overflow only once summed.
    emb = torch.nn.Embedding(4, 2, sparse=True).half()
    scaler = DynamicLossScaler("cpu", init_scale=2.0**14)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    w = torch.full((2, 1), 3.0, dtype=torch.float16)
    scaler.scale((emb(torch.tensor([1, 1])) * w).sum()).backward()  # each 3 * 2^14 < 65504; summed > 65504
    scaler.step(opt)
    scaler.update()
    assert torch.equal(emb.weight, before) and int(scaler.skipped_steps) == 1


class ProtocolSGD(torch.optim.Optimizer):
    """A non-fused optimizer that follows GradScaler's protocol: it unscales
    by ``self.grad_scale`` and skips on ``self.found_inf`` itself."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale, found_inf = self.grad_scale, self.found_inf  # AttributeError without the protocol
        self.seen.append((None if grad_scale is None else grad_scale.item(), found_inf.item()))
        if found_inf.item():
            return None
        for g in self.param_groups:
            for p in g["params"]:
                grad = p.grad if grad_scale is None else p.grad / grad_scale
                p.add_(grad, alpha=-g["lr"])
        return None


@pytest.mark.parametrize("explicit_unscale", [False, True])
def test_optimizer_declaring_step_supports_amp_scaling_gets_grad_scale_and_found_inf(explicit_unscale):
    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    opts = [ProtocolSGD([p], lr=0.01) for p in ps]
    scalers = pair(2.0**8, growth_interval=2)
    for i, overflow in enumerate(overflow_pattern(9, 16)):
        for p, o, s in zip(ps, opts, scalers):
            c = torch.tensor([1.0, float("inf") if overflow else 2.0, 3.0])
            s.scale((p * c).sum()).backward()
            if explicit_unscale:
                s.unscale_(o)
            s.step(o)
            s.update()
            p.grad = None
        assert torch.equal(ps[0], ps[1]), i
    assert opts[0].seen == opts[1].seen
    assert all((g is None) == explicit_unscale for g, _ in opts[0].seen)
    assert not hasattr(opts[0], "grad_scale") and not hasattr(opts[0], "found_inf")


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour on a machine without CUDA")
def test_without_cuda_the_default_scaler_warns_and_disables_like_gradscaler():
    with pytest.warns(UserWarning, match="DynamicLossScaler is enabled, but CUDA is not available"):
        ours = DynamicLossScaler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.amp.GradScaler()
    assert ours.is_enabled() is theirs.is_enabled() is False
    ours.load_state_dict({"scale": 8.0})  # a no-op when disabled, as in GradScaler
    assert ours.state_dict() == {} and ours.get_scale() == 1.0
    p = torch.nn.Parameter(torch.ones(2))
    loss = (p * 2).sum()
    assert ours.scale(loss) is loss
    loss.backward()
    ours.step(torch.optim.SGD([p], lr=1.0))
    ours.update()
    assert p.tolist() == [-1.0, -1.0]


def test_load_state_dict_before_the_first_scale_touches_no_device():
    ours = DynamicLossScaler("cpu", **WIDE)
    sd = {"scale": 3.0 * 2**10, "growth_factor": 3.0, "backoff_factor": 0.8, "growth_interval": 2,
          "_growth_tracker": 1}
    ours.load_state_dict(sd)
    assert ours._scale is None and ours.get_scale() == 3.0 * 2**10 and ours._get_growth_tracker() == 1
    p = torch.nn.Parameter(torch.ones(2))
    one_step(ours, p, False)  # the tracker reaches the interval: grows by 3
    assert ours.get_scale() == 9.0 * 2**10
    # Accelerate creates the state itself after loading (its FSDP2 path).
    acc = DynamicLossScaler("cpu")
    acc.load_state_dict(ours.state_dict())
    acc._lazy_init_scale_growth_tracker(acc._device)
    assert acc.get_scale() == 9.0 * 2**10 and acc._scale.device.type == "cpu"


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_after_many_updates_continue_like_gradscaler(how):
    ours, theirs = pair(1000.0, 3.0, 0.8, growth_interval=2, hysteresis=1)
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    pattern = overflow_pattern(4, 40)
    for overflow in pattern[:20]:  # past the stuck check's copies (every 8 updates)
        one_step(ours, p, overflow)
        one_step(theirs, q, overflow)
    state = ours.__getstate__()
    assert not any(isinstance(v, torch.Tensor) or (isinstance(v, tuple) and v) for v in state.values()), state
    if how == "pickle":
        ours2, theirs2 = pickle.loads(pickle.dumps(ours)), pickle.loads(pickle.dumps(theirs))
    else:
        ours2, theirs2 = copy.deepcopy(ours), copy.deepcopy(theirs)
    assert isinstance(ours2, DynamicLossScaler) and ours2.state_dict() == ours.state_dict()
    for i, overflow in enumerate(pattern[20:]):
        for s, t in ((ours, p), (ours2, p), (theirs2, q)):
            one_step(s, t, overflow)
        assert ours.get_scale() == ours2.get_scale() == theirs2.get_scale(), i
    assert ours.state_dict() == ours2.state_dict()
    buf = io.BytesIO()
    torch.save(ours2, buf)  # torch.save pickles it too


def test_pickle_in_the_middle_of_an_iteration_raises_like_gradscaler():
    ours = DynamicLossScaler("cpu")
    p = torch.nn.Parameter(torch.ones(2))
    ours.scale(p.sum()).backward()
    ours.unscale_(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(RuntimeError, match="may only be pickled at the beginning of an iteration"):
        pickle.dumps(ours)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: the scaler holds a CUDA event there")
def test_cuda_scaler_pickles_and_deepcopies_after_many_updates():
    scaler = DynamicLossScaler("cuda", init_scale=2.0**8, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(2, device="cuda"))
    opt = torch.optim.SGD([p], lr=0.0)
    for i in range(20):  # the stuck check records a CUDA event every 8 updates
        c = torch.tensor([1.0, float("inf") if i % 5 == 0 else 2.0], device="cuda")
        scaler.scale((p * c).sum()).backward()
        scaler.step(opt)
        scaler.update()
        p.grad = None
    assert scaler._watch is not None and scaler._watch[2] is not None
    for clone in (pickle.loads(pickle.dumps(scaler)), copy.deepcopy(scaler)):
        assert clone.state_dict() == scaler.state_dict()
        clone.scale((p * 1.0).sum()).backward()
        clone.step(opt)
        clone.update()
        p.grad = None
        assert clone._scale.device.type == "cuda"


class CountHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value by the host (item(), bool(), tolist())."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


class DeviceSkipSGD(ProtocolSGD):
    """GradScaler's protocol without host reads: unscales by grad_scale and
    applies the step times (1 - found_inf)."""

    @torch.no_grad()
    def step(self, closure=None):
        keep = 1 - self.found_inf
        for g in self.param_groups:
            for p in g["params"]:
                grad = p.grad if self.grad_scale is None else p.grad / self.grad_scale
                p.sub_(torch.nan_to_num(grad) * (g["lr"] * keep))


@pytest.mark.parametrize("linear,opt_kind,growth_factor,reads", [
    (torch.nn.Linear, "fused", 2.0, 0),   # GradScaler's protocol: check-only pass, grad_scale to the optimizer
    (torch.nn.Linear, "fused", 3.0, 0),   # the any-factor rule runs on the device too
    ("ours", "fused", 2.0, 0),            # deepseek_ext.nn.Linear: the scaler unscales the rest, grad_scale None
    (torch.nn.Linear, "plain", 2.0, 1),   # the one found_inf read that decides whether to step
    (torch.nn.Linear, "protocol", 3.0, 0),
])
def test_host_reads_per_step(linear, opt_kind, growth_factor, reads):
    import deepseek_ext.nn
    lin = deepseek_ext.nn.Linear if linear == "ours" else linear
    torch.manual_seed(0)
    model = torch.nn.Sequential(lin(8, 16), torch.nn.LayerNorm(16), lin(16, 1))
    if opt_kind == "protocol":
        opt = DeviceSkipSGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=opt_kind == "fused")
    scaler = DynamicLossScaler("cpu", growth_factor=growth_factor, growth_interval=2)
    x, y = torch.randn(4, 8), torch.randn(4, 1)

    def step():
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        scaler.scale(torch.nn.functional.mse_loss(out.float(), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    step()
    mode = CountHostReads()
    with mode:
        for _ in range(3):  # updates 2-4: the stuck check reads its copy only every 8th
            step()
    assert mode.count == 3 * reads


def test_hysteresis_and_bounds_with_any_factors_follow_the_rule():
    """What ours adds, with factors that are not powers of two: the rule of
    update_scale_ (hysteresis, bounds, skip counters), products in float64
    rounded to float32."""
    lo, hi, growth, backoff, interval, hysteresis = 2.0**6, 2.0**12, 3.0, 0.8, 2, 2
    scaler = DynamicLossScaler("cpu", init_scale=100.0, growth_factor=growth, backoff_factor=backoff,
                               growth_interval=interval, hysteresis=hysteresis, min_scale=lo, max_scale=hi)
    f32 = lambda x: torch.tensor(x, dtype=torch.float64).float().item()  # noqa: E731
    scale, tracker, left, consecutive, total = 100.0, 0, hysteresis, 0, 0
    p = torch.nn.Parameter(torch.ones(2))
    seen = set()
    for i, overflow in enumerate(overflow_pattern(8, 300, 0.4)):
        one_step(scaler, p, overflow)
        seen.add(scale)
        if overflow:
            consecutive, total, tracker, left = consecutive + 1, total + 1, 0, max(left - 1, 0)
            if left == 0:
                scale = min(max(f32(scale * backoff), lo), hi)
        else:
            consecutive, tracker = 0, tracker + 1
            if tracker >= interval:
                tracker, left, scale = 0, hysteresis, min(max(f32(scale * growth), lo), hi)
        sd = scaler.state_dict()
        assert (sd["scale"], sd["_growth_tracker"], sd["_hysteresis_tracker"], sd["_skip_counts"]) == (
            scale, tracker, left, [consecutive, total]), i
    assert len(seen) > 10 and lo in seen and hi in seen  # it moved, and met both bounds


def test_float16_and_bfloat16_gradients_are_unscaled_where_gradscaler_refuses():
    for dtype in (torch.float16, torch.bfloat16):
        p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        ours = DynamicLossScaler("cpu", init_scale=2.0**8)
        opt = torch.optim.SGD([p], lr=0.0)
        ours.scale((p.float() * 3).sum()).backward()
        ours.unscale_(opt)
        assert p.grad.dtype == dtype and p.grad.tolist() == [3.0] * 4
    theirs = torch.amp.GradScaler("cpu")
    q = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    theirs.scale((q.float() * 3).sum()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        theirs.unscale_(torch.optim.SGD([q], lr=0.0))
