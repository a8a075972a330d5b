"""update_scale_ and DynamicLossScaler."""

import copy
import math
import random

import pytest
import torch
from torch.library import opcheck

import deepseek_ext
from deepseek_ext.amp import DynamicLossScaler, LossScaleStuckError
from deepseek_ext.nn import Linear
from utils import DEVICES


class ReferenceScaler:
    """The rule of detail/loss_scale.h, in plain Python."""

    def __init__(self, scale, growth, backoff, interval, hysteresis, lo, hi):
        self.scale, self.growth, self.backoff, self.interval = scale, growth, backoff, interval
        self.hysteresis, self.lo, self.hi = hysteresis, lo, hi
        self.tracker, self.hyst_left, self.consecutive, self.total = 0, hysteresis, 0, 0

    def _set(self, x):
        x = min(max(x, self.lo), self.hi)
        self.scale = 2.0 ** math.floor(math.log2(x))

    def step(self, overflow):
        if overflow:
            self.consecutive += 1
            self.total += 1
            self.tracker = 0
            self.hyst_left = max(self.hyst_left - 1, 0)
            if self.hyst_left == 0:
                self._set(self.scale * self.backoff)
        else:
            self.consecutive = 0
            self.tracker += 1
            if self.tracker >= self.interval:
                self.tracker = 0
                self.hyst_left = self.hysteresis
                self._set(self.scale * self.growth)


def state(device, scale, hysteresis):
    return (torch.full((1,), scale, device=device), torch.zeros(1, dtype=torch.int32, device=device),
            torch.full((1,), hysteresis, dtype=torch.int32, device=device),
            torch.zeros(2, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_update_scale_matches_reference(device, seed):
    rng = random.Random(seed)
    growth, backoff = rng.choice([(2.0, 0.5), (4.0, 0.25), (8.0, 0.5)])
    interval, hysteresis = rng.choice([1, 2, 5]), rng.choice([1, 2, 3])
    lo, hi = 2.0 ** rng.choice([-4, 0, 3]), 2.0 ** rng.choice([10, 16, 24])
    ref = ReferenceScaler(2.0**8, growth, backoff, interval, hysteresis, lo, hi)
    sc, gt, ht, sk = state(device, 2.0**8, hysteresis)
    p_overflow = rng.choice([0.05, 0.3, 0.7])
    for _ in range(300):
        overflow = rng.random() < p_overflow
        found = torch.full((1,), float(overflow), device=device)
        deepseek_ext.ops.update_scale_(sc, gt, ht, sk, found, growth, backoff, interval, hysteresis, lo, hi)
        ref.step(overflow)
        assert sc.item() == ref.scale
        assert (gt.item(), ht.item(), sk[0].item(), sk[1].item()) == (ref.tracker, ref.hyst_left, ref.consecutive,
                                                                      ref.total)
        assert lo <= sc.item() <= hi and math.frexp(sc.item())[0] == 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_growth_waits_for_a_clean_interval_and_hysteresis_delays_backoff(device):
    sc, gt, ht, sk = state(device, 1024.0, 2)
    args = (2.0, 0.5, 3, 2, 1.0, 2.0**20)
    ok, bad = torch.zeros(1, device=device), torch.ones(1, device=device)
    for _ in range(2):
        deepseek_ext.ops.update_scale_(sc, gt, ht, sk, ok, *args)
    assert sc.item() == 1024.0  # 2 clean steps < interval 3: no growth yet
    deepseek_ext.ops.update_scale_(sc, gt, ht, sk, ok, *args)
    assert sc.item() == 2048.0
    deepseek_ext.ops.update_scale_(sc, gt, ht, sk, bad, *args)
    assert sc.item() == 2048.0 and ht.item() == 1  # first overflow absorbed by hysteresis
    deepseek_ext.ops.update_scale_(sc, gt, ht, sk, bad, *args)
    assert sc.item() == 1024.0 and sk.tolist() == [2, 2]
    deepseek_ext.ops.update_scale_(sc, gt, ht, sk, ok, *args)
    assert sk.tolist() == [0, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_scale_never_leaves_bounds(device):
    sc, gt, ht, sk = state(device, 4.0, 1)
    for _ in range(10):
        deepseek_ext.ops.update_scale_(sc, gt, ht, sk, torch.ones(1, device=device), 2.0, 0.5, 1, 1, 1.0, 8.0)
    assert sc.item() == 1.0
    for _ in range(10):
        deepseek_ext.ops.update_scale_(sc, gt, ht, sk, torch.zeros(1, device=device), 2.0, 0.5, 1, 1, 1.0, 8.0)
    assert sc.item() == 8.0


def test_update_scale_bad_inputs():
    sc, gt, ht, sk = state("cpu", 1.0, 1)
    f = torch.zeros(1)
    good = (2.0, 0.5, 10, 1, 1.0, 2.0**16)
    cases = [
        ((sc.double(), gt, ht, sk, f) + good, "scale must be a Float tensor"),
        ((sc, gt.long(), ht, sk, f) + good, "growth_tracker must be a Int tensor"),
        ((sc, gt, ht, torch.zeros(3, dtype=torch.int64), f) + good, r"skip_counts must have 2 element"),
        ((sc, gt, ht, sk, f, 1.0, 0.5, 10, 1, 1.0, 2.0**16), "growth_factor must be a power of two > 1"),
        ((sc, gt, ht, sk, f, 1.5, 0.5, 10, 1, 1.0, 2.0**16), "growth_factor must be a power of two > 1"),
        ((sc, gt, ht, sk, f, 2.0, 1.5, 10, 1, 1.0, 2.0**16), r"backoff_factor must be a power of two in \(0, 1\)"),
        ((sc, gt, ht, sk, f, 2.0, 0.9, 10, 1, 1.0, 2.0**16), r"backoff_factor must be a power of two in \(0, 1\)"),
        ((sc, gt, ht, sk, f, 2.0, 0.5, 0, 1, 1.0, 2.0**16), "growth_interval must be in"),
        ((sc, gt, ht, sk, f, 2.0, 0.5, 10, 0, 1.0, 2.0**16), "hysteresis must be in"),
        ((sc, gt, ht, sk, f, 2.0, 0.5, 10, 1, 3.0, 2.0**16), "min_scale must be a finite power of two"),
        ((sc, gt, ht, sk, f, 2.0, 0.5, 10, 1, 4.0, 2.0), r"min_scale \(4\) must be <= max_scale"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            deepseek_ext.ops.update_scale_(*args)
    assert sc.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_update_scale_opcheck_and_compile(device):
    args = state(device, 2.0**10, 1) + (torch.ones(1, device=device), 2.0, 0.5, 2000, 1, 1.0, 2.0**24)
    opcheck(torch.ops.deepseek_ext.update_scale_.default, args)

    def step(sc, gt, ht, sk, found):
        deepseek_ext.ops.update_scale_(sc, gt, ht, sk, found, 2.0, 0.5, 1, 1, 1.0, 2.0**24)
        return sc * 1

    compiled = torch.compile(step, fullgraph=True)
    s1, s2 = state(device, 64.0, 1), state(device, 64.0, 1)
    for flag in (0.0, 1.0, 1.0, 0.0):
        found = torch.full((1,), flag, device=device)
        assert compiled(*s1, found).item() == step(*s2, found).item()


def test_update_scale_torchscript():
    @torch.jit.script
    def step(sc: torch.Tensor, gt: torch.Tensor, ht: torch.Tensor, sk: torch.Tensor, f: torch.Tensor):
        torch.ops.deepseek_ext.update_scale_(sc, gt, ht, sk, f, 2.0, 0.5, 1, 1, 1.0, 1024.0)

    s = state("cpu", 64.0, 1)
    step(*s, torch.zeros(1))
    assert s[0].item() == 128.0


# --- DynamicLossScaler --------------------------------------------------------

def make_model(seed=0, cls=Linear):
    torch.manual_seed(seed)
    return torch.nn.Sequential(cls(16, 64), torch.nn.GELU(), cls(64, 64), torch.nn.GELU(), cls(64, 1))


def test_constructor_rejects_bad_configuration():
    with pytest.raises(ValueError, match="min_scale must be a finite power of two"):
        DynamicLossScaler("cpu", min_scale=3.0)
    with pytest.raises(ValueError, match="growth_factor must be a finite number > 1"):
        DynamicLossScaler("cpu", growth_factor=1.0)
    with pytest.raises(ValueError, match=r"backoff_factor must be a number in \(0, 1\)"):
        DynamicLossScaler("cpu", backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval must be a positive int"):
        DynamicLossScaler("cpu", growth_interval=0)
    with pytest.raises(ValueError, match="hysteresis must be a positive int"):
        DynamicLossScaler("cpu", hysteresis=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interval", [1, 3, 50])
def test_scale_trajectory_matches_torch_amp_update_scale(device, interval):
    """With hysteresis 1 and bounds out of reach, the rule is GradScaler's."""
    rng = random.Random(interval)
    ours = state(device, 2.0**16, 1)
    theirs = (torch.full((1,), 2.0**16, device=device), torch.zeros(1, dtype=torch.int32, device=device))
    p_overflow = 0.5 if interval == 1 else 0.2  # a random walk that stays far from the bounds
    for _ in range(400):
        found = torch.full((1,), float(rng.random() < p_overflow), device=device)
        deepseek_ext.ops.update_scale_(*ours, found, 2.0, 0.5, interval, 1, 2.0**-100, 2.0**127)
        torch._amp_update_scale_(theirs[0], theirs[1], found, 2.0, 0.5, interval)
        assert ours[0].item() == theirs[0].item() and ours[1].item() == theirs[1].item()


def test_defaults_match_gradscaler():
    ours, theirs = DynamicLossScaler("cpu"), torch.amp.GradScaler("cpu")
    assert ours.get_scale() == theirs.get_scale() == 2.0**16
    assert ours.get_growth_factor() == theirs.get_growth_factor()
    assert ours.get_backoff_factor() == theirs.get_backoff_factor()
    assert ours.get_growth_interval() == theirs.get_growth_interval()
    assert not DynamicLossScaler.for_dtype(torch.bfloat16, "cpu").is_enabled()
    assert DynamicLossScaler.for_dtype(torch.float16, "cpu").is_enabled()


def train_step(model, opt, scaler, x, y, plant_nan=False):
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    if plant_nan:  # one NaN produced in backward: it reaches the gradients of every layer below
        out.register_hook(lambda g: g.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"),
                                                                                              dtype=g.dtype)))
    loss = torch.nn.functional.mse_loss(out.float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def assert_step_skipped(model, opt, scaler, params, opt_state):
    # Weights and optimizer state bit-identical to before the step; the scale
    # backed off once from 2^8 and one skip counted.
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    after = opt.state_dict()["state"]
    for i, st in opt_state["state"].items():
        for k, v in st.items():
            assert torch.equal(after[i][k], v), (i, k)
    assert scaler.get_scale() == 2.0**7 and scaler.skipped_steps.item() == 1


@pytest.mark.parametrize("fused", [False, True])
def test_nan_skips_step_bit_identically(fused):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = DynamicLossScaler("cpu", init_scale=2.0**8)
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    train_step(model, opt, scaler, x, y)
    params = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    train_step(model, opt, scaler, x, y, plant_nan=True)
    assert_step_skipped(model, opt, scaler, params, opt_state)
    train_step(model, opt, scaler, x, y)  # and training goes on
    assert not torch.equal(model.state_dict()["0.weight"], params["0.weight"])


@pytest.mark.parametrize("fused", [False, True])
def test_nan_planted_after_backward_in_a_gradient_the_scaler_unscales(fused):
    # Linear's weight and bias gradients are checked in their GEMMs; a LayerNorm's
    # are checked by unscale_'s pass: a NaN put there after backward skips the step too.
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(16, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = DynamicLossScaler("cpu", init_scale=2.0**8)
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    train_step(model, opt, scaler, x, y)
    params, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    scaler.scale(torch.nn.functional.mse_loss(out.float(), y)).backward()
    model[1].weight.grad[3] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert_step_skipped(model, opt, scaler, params, opt_state)


def test_linear_weight_grads_are_unscaled_in_the_gemm_and_not_twice():
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    ours, ref = make_model(1), make_model(1, torch.nn.Linear)
    ours.load_state_dict(ref.state_dict())
    scaler = DynamicLossScaler("cpu", init_scale=2.0**10)
    opt = torch.optim.SGD(ours.parameters(), lr=0.0)
    loss = torch.nn.functional.mse_loss(ours(x), y)
    scaler.scale(loss).backward()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    # Linear weights, and on the CPU the biases too (a ones-row GEMM): already unscaled.
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[0].bias.grad, ref[0].bias.grad, rtol=1e-5, atol=1e-6)
    scaler.unscale_(opt)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_stale_or_disabled_scaler_does_not_touch_later_backward():
    x, y = torch.randn(16, 16), torch.randn(16, 1)
    ours, ref = make_model(5), make_model(5, torch.nn.Linear)
    ours.load_state_dict(ref.state_dict())
    old = DynamicLossScaler("cpu", init_scale=2.0**10)
    opt = torch.optim.SGD(ours.parameters(), lr=0.0)
    old.scale(torch.nn.functional.mse_loss(ours(x), y)).backward()
    old.step(opt)
    old.update()  # the old run is over, the scaler object still alive
    opt.zero_grad()
    torch.nn.functional.mse_loss(ours(x), y).backward()  # plain backward
    torch.nn.functional.mse_loss(ref(x), y).backward()
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-6)
    # A disabled scaler (bf16 training) in use after an enabled one: same.
    opt.zero_grad()
    old.scale(torch.nn.functional.mse_loss(ours(x), y))  # enabled scaler scales a loss, never steps
    DynamicLossScaler.for_dtype(torch.bfloat16, "cpu").scale(torch.nn.functional.mse_loss(ours(x), y)).backward()
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_load_state_dict_keeps_the_scale_in_bounds():
    scaler = DynamicLossScaler("cpu")
    sd = DynamicLossScaler("cpu", min_scale=4.0, max_scale=2.0**10).state_dict()
    for loaded, expected in ((3000.0, 2.0**10), (100.0, 100.0), (1.0, 4.0)):  # in bounds: as saved, as GradScaler
        sd["scale"] = loaded
        scaler.load_state_dict(sd)
        assert scaler.get_scale() == expected


def test_linear_is_a_drop_in():
    ref = torch.nn.Linear(8, 4)
    ours = Linear(8, 4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ours(x), ref(x))
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == list(ref.state_dict())


def test_state_dict_round_trip_continues_identically():
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    model = make_model(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = DynamicLossScaler("cpu", init_scale=2.0**12, growth_interval=3, hysteresis=2)
    for i in range(5):
        train_step(model, opt, scaler, x, y, plant_nan=(i == 1))
    snap = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), scaler.state_dict())
    losses_a = [train_step(model, opt, scaler, x, y, plant_nan=(i == 2)) for i in range(6)]
    final_a = copy.deepcopy(model.state_dict())

    model2 = make_model(3)
    model2.load_state_dict(snap[0])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(snap[1])
    scaler2 = DynamicLossScaler("cpu")
    scaler2.load_state_dict(snap[2])
    losses_b = [train_step(model2, opt2, scaler2, x, y, plant_nan=(i == 2)) for i in range(6)]
    assert [l.item() for l in losses_a] == [l.item() for l in losses_b]
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final_a[k]), k
    assert scaler2.state_dict() == scaler.state_dict()


def test_stuck_at_min_scale_raises_clear_error():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = DynamicLossScaler("cpu", init_scale=4.0, min_scale=1.0, max_skips_at_min_scale=5)
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    x[0, 0] = float("nan")  # a NaN from the data: no loss scale can fix it
    with pytest.raises(LossScaleStuckError, match="in a row were skipped"):
        for _ in range(20):
            train_step(model, opt, scaler, x, y)
    assert scaler.get_scale() == 1.0  # never collapsed to zero


def test_fp16_training_reaches_fp32_loss():
    """A small regression MLP trained in float16 autocast with our Linear + scaler
    ends within 2% of the same model trained in float32."""
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(16, 1, generator=gen)
    x = torch.randn(512, 16, generator=gen)
    y = torch.tanh(x @ w_true) + 0.05 * torch.randn(512, 1, generator=gen)

    def run(mixed):
        model = make_model(4, Linear if mixed else torch.nn.Linear)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        scaler = DynamicLossScaler("cpu", enabled=mixed, growth_interval=50)
        for i in range(300):
            xb, yb = x[(i * 64) % 512:(i * 64) % 512 + 64], y[(i * 64) % 512:(i * 64) % 512 + 64]
            with torch.autocast("cpu", dtype=torch.float16, enabled=mixed):
                out = model(xb)
            loss = torch.nn.functional.mse_loss(out.float(), yb)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x).float(), y).item()

    fp32, fp16 = run(False), run(True)
    assert abs(fp16 - fp32) <= 0.02 * fp32 + 1e-4, (fp16, fp32)
