"""deepseek_ext.train.ProgressiveSchedule: phases, growth, freezing, optimizer state."""

import copy
import itertools

import pytest
import torch
from torch import nn

from deepseek_ext.train import FractionSampler, ProgressiveSchedule, growth_order


class Block(nn.Module):
    """A residual MLP block; ``shared`` (when given) is used by several blocks."""

    def __init__(self, d, shared=None, shared_gain=None):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.shared = shared
        self.gain = shared_gain
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = self.norm(x)
        if self.shared is not None:
            h = self.shared(h) * self.gain
        return x + self.down(torch.relu(self.up(h)))


class TinyModel(nn.Module):
    def __init__(self, d=16, n_layers=2, share=False, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        shared = nn.Linear(d, d) if share else None
        gain = nn.Parameter(torch.ones(d)) if share else None
        self.layers = nn.ModuleList(Block(d, shared, gain) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


def loss_of(model, gen):
    idx = torch.randint(0, 11, (4, 8), generator=gen)
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())


def train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, gen).backward()
        opt.step()


def test_phases_and_data_fraction_switch_at_the_right_steps():
    s = ProgressiveSchedule(100, phase1_frac=0.3, phase3_frac=0.2, data_fraction_start=0.1)
    expect = {0: (1, 0.1), 29: (1, 0.1), 30: (2, 0.1), 55: (2, 0.55), 79: (2, 0.982), 80: (3, 1.0), 99: (3, 1.0)}
    for step, (phase, frac) in expect.items():
        assert s.on_step(step) == phase == s.phase
        assert s.data_fraction() == pytest.approx(frac, abs=1e-9)
    fr = [s.on_step(k) or s.data_fraction() for k in range(100)]
    assert all(a <= b for a, b in zip(fr, fr[1:]))  # never shrinks


def test_growth_orders():
    assert growth_order(2, 4) == [0, 0, 1, 1]
    assert growth_order(3, 4) == [0, 1, 1, 2]
    assert growth_order(4, 6) == [0, 1, 1, 2, 3, 3]
    assert growth_order(2, 5, "stack") == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="exceed"):
        growth_order(4, 4)


def test_maybe_grow_fires_once_at_each_growth_step():
    torch.manual_seed(0)
    model = TinyModel(n_layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s = ProgressiveSchedule(100, grow_at=[20, 50], grow_to_layers=[2, 4], phase3_frac=0.0)
    depth = []
    for step in range(100):
        s.on_step(step)
        changed = s.maybe_grow(model, opt)
        assert changed == (step in (20, 50))
        depth.append(len(model.layers))
    assert depth[19] == 1 and depth[20] == 2 and depth[49] == 2 and depth[50] == 4 and depth[99] == 4


@pytest.mark.parametrize("growth", ["interleave", "stack"])
def test_grown_model_computes_the_old_blocks_in_the_specified_order(growth):
    torch.manual_seed(0)
    model = TinyModel(n_layers=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 5)
    old = list(model.layers)
    idx = torch.randint(0, 11, (3, 7))
    s = ProgressiveSchedule(10, grow_to_layers=5, growth=growth)
    s.on_step(s.grow_at[0])
    assert s.maybe_grow(model, opt)
    order = growth_order(3, 5, growth)
    x = model.embed(idx)
    for i in order:
        x = old[i](x)
    ref = model.head(x)
    with torch.no_grad():
        assert torch.equal(model(idx), ref)
    # first occurrences are the original objects, the rest are fresh copies
    firsts = {order.index(i) for i in range(3)}
    for k, blk in enumerate(model.layers):
        assert (blk is old[order[k]]) == (k in firsts)
        assert torch.equal(blk.up.weight, old[order[k]].up.weight)


def test_zero_init_copies_keep_the_function_exactly():
    torch.manual_seed(0)
    model = TinyModel(n_layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 5)
    idx = torch.randint(0, 11, (3, 7))
    with torch.no_grad():
        before = model(idx)

    def zero_out(blk):
        nn.init.zeros_(blk.down.weight)
        nn.init.zeros_(blk.down.bias)

    s = ProgressiveSchedule(10, grow_to_layers=4, init_new_block=zero_out)
    s.on_step(s.grow_at[0])
    s.maybe_grow(model, opt)
    assert len(model.layers) == 4
    with torch.no_grad():
        assert torch.equal(model(idx), before)
    train(model, opt, 3)  # and training continues: the copies move off zero
    assert model.layers[1].down.weight.abs().sum() > 0


def test_shared_parameters_stay_shared_in_the_copies():
    torch.manual_seed(0)
    model = TinyModel(n_layers=2, share=True)
    shared, gain = model.layers[0].shared, model.layers[0].gain
    n_unique = len(list(model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    s = ProgressiveSchedule(10, grow_to_layers=4)
    s.on_step(s.grow_at[0])
    s.maybe_grow(model, opt)
    for blk in model.layers:
        assert blk.shared is shared and blk.gain is gain
    assert model.layers[1].up is not model.layers[0].up
    per_block = len(list(model.layers[0].norm.parameters())) + 4  # norm + up + down (weight, bias)
    assert len(list(model.parameters())) == n_unique + 2 * per_block
    groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(groups) == len({id(p) for p in groups}) == len(list(model.parameters()))
    train(model, opt, 2)  # one shared weight, still the same object everywhere
    assert all(blk.shared.weight is shared.weight for blk in model.layers)


def test_optimizer_gets_the_new_parameters_with_copied_state():
    torch.manual_seed(0)
    model = TinyModel(n_layers=2)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    train(model, opt, 4)
    src = model.layers[0]
    src_state = {k: v.clone() for k, v in opt.state[src.up.weight].items()}
    s = ProgressiveSchedule(10, grow_to_layers=4)
    s.on_step(s.grow_at[0])
    s.maybe_grow(model, opt)
    dup = model.layers[1]  # interleave: [0, 0, 1, 1]
    assert dup is not src
    assert any(dup.up.weight is p for p in opt.param_groups[0]["params"])
    assert any(dup.up.bias is p for p in opt.param_groups[1]["params"])
    st = opt.state[dup.up.weight]
    assert st["exp_avg"] is not opt.state[src.up.weight]["exp_avg"]
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(st[k], src_state[k]) and torch.equal(opt.state[src.up.weight][k], src_state[k])
    before = dup.up.weight.detach().clone()
    train(model, opt, 1, seed=1)
    assert not torch.equal(dup.up.weight, before)
    # without state copying, the copies start fresh
    model2 = TinyModel(n_layers=2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    train(model2, opt2, 2)
    s2 = ProgressiveSchedule(10, grow_to_layers=4, copy_optimizer_state=False)
    s2.on_step(s2.grow_at[0])
    s2.maybe_grow(model2, opt2)
    assert model2.layers[1].up.weight not in opt2.state


def test_freezing_stops_updates_and_leaves_the_optimizer():
    torch.manual_seed(0)
    model = TinyModel(n_layers=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    s = ProgressiveSchedule(10, phase3_frac=0.5, freeze_top_n=1, keep_trainable=("head",))
    train(model, opt, 2)  # leaves stale grads behind
    s.on_step(5)
    assert s.maybe_grow(model, opt) and s.frozen
    top = set(map(id, model.layers[-1].parameters())) | set(map(id, model.head.parameters()))
    assert {id(p) for p in s.trainable_parameters(model)} == top
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == top and {id(p) for p in opt.state} <= top
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in top}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in top}
    train(model, opt, 3, seed=2)
    for n, p in model.named_parameters():
        if n in frozen:
            assert not p.requires_grad and p.grad is None and torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trained[n]), n
    s.on_step(6)
    assert not s.maybe_grow(model, opt)  # already frozen


def test_fraction_sampler_draws_from_the_growing_subset():
    s = ProgressiveSchedule(100, phase1_frac=0.5, phase3_frac=0.0, data_fraction_start=0.1)
    sampler = FractionSampler(1000, s, seed=3)
    it = iter(sampler)
    s.on_step(0)
    first = {next(it) for _ in range(2000)}
    assert first == set(sampler.perm[:100].tolist())
    s.on_step(99)
    later = {next(it) for _ in range(5000)}
    assert len(later) > 900 and later <= set(range(1000))


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        ProgressiveSchedule(0)
    with pytest.raises(ValueError, match="phase1_frac"):
        ProgressiveSchedule(10, phase1_frac=0.8, phase3_frac=0.5)
    with pytest.raises(ValueError, match="grow_at"):
        ProgressiveSchedule(10, grow_at=[5, 3], grow_to_layers=[4, 8])
    with pytest.raises(ValueError, match="same length"):
        ProgressiveSchedule(10, grow_at=[3], grow_to_layers=[4, 8])
    with pytest.raises(ValueError, match="data_fraction_start"):
        ProgressiveSchedule(10, data_fraction_start=0.0)
    with pytest.raises(ValueError, match="growth"):
        ProgressiveSchedule(10, growth="widen")
    s = ProgressiveSchedule(10, grow_to_layers=4, layers_attr="head")
    s.on_step(5)
    with pytest.raises(TypeError, match="ModuleList"):
        s.maybe_grow(TinyModel(), None)
