"""Progressive training: a small model on a fraction of the data first, then a
deeper model on more data, then only the top layers.

The schedule is a handful of hooks any plain PyTorch loop can call::

    sched = ProgressiveSchedule(total_steps, grow_to_layers=8, freeze_top_n=2)
    sampler = FractionSampler(len(ds), sched)           # draws from the first data_fraction()
    loader = iter(DataLoader(ds, batch_size=32, sampler=sampler))
    opt = torch.optim.AdamW(sched.trainable_parameters(model), lr=3e-4)
    for step in range(total_steps):
        sched.on_step(step)
        sched.maybe_grow(model, opt)                     # grows / freezes on schedule
        x, y = next(loader)
        ...

Phases (``step`` is what the loop last passed to ``on_step``):

- phase 1, ``step < phase1_end = round(phase1_frac * total_steps)``: the data
  fraction is ``data_fraction_start``;
- phase 2, up to ``phase3_start = total_steps - round(phase3_frac * total_steps)``:
  the data fraction grows linearly from ``data_fraction_start`` to 1 (reaching 1
  at ``phase3_start``), and the model is deepened at each step of ``grow_at``
  (default: ``phase1_end``) to the matching ``grow_to_layers``;
- phase 3: data fraction 1; if ``freeze_top_n`` is set, every parameter except
  those of the top ``freeze_top_n`` blocks (and those whose names start with a
  prefix in ``keep_trainable``) is frozen.

**Growth** (``getattr(model, layers_attr)`` must be an ``nn.ModuleList``) from
L to L' blocks builds the new list from an ``order`` of original indices:
``growth="interleave"`` repeats blocks in place (L=2 -> 4: ``[0, 0, 1, 1]``;
when L' is not a multiple of L the extra copies go to evenly spaced blocks),
``growth="stack"`` appends copies of the bottom blocks on top (Gong et al. 2019;
2 -> 4: ``[0, 1, 0, 1]``). The first occurrence of each index is the original
module object (its parameters and optimizer state untouched); the others are
deep copies in which every parameter, buffer or module that the original shares
with another block or with the rest of the model stays the *same* object
(cross-layer sharing survives). So right after growth the model computes
exactly what the old blocks compose to in that order, e.g. ``b1(b1(b0(b0(x))))``
for interleave. ``init_new_block(block)``, when given, is called on every copy:
zeroing the output projections of residual blocks there makes each copy the
identity and the grown model computes exactly the function it had before growth.

**Optimizer**: each new (unshared) parameter joins the param group of the
parameter it was copied from, with a copy of that parameter's optimizer state
when ``copy_optimizer_state`` (so Adam moments continue as for the original),
else no state (it starts fresh). **Freezing** sets ``requires_grad=False`` and
``grad=None`` on frozen parameters and removes them, with their state, from the
optimizer's param groups (their optimizer memory is freed and no weight decay or
momentum moves them). ``trainable_parameters(model)`` lists what is trained now.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler


def _get_attr(model: nn.Module, dotted: str):
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(model: nn.Module, dotted: str, value):
    *parents, last = dotted.split(".")
    obj = model
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def growth_order(num_layers: int, new_layers: int, growth: str = "interleave") -> List[int]:
    """Which original block sits at each position of the grown list."""
    L, N = num_layers, new_layers
    if N <= L:
        raise ValueError(f"grow_to_layers must exceed the current depth {L}, got {N}")
    if growth == "stack":
        return [i % L for i in range(N)]
    if growth == "interleave":
        reps = [N // L] * L
        extra = N % L
        for k in range(extra):  # evenly spaced blocks get one more copy
            reps[int((k + 0.5) * L / extra)] += 1
        return [i for i in range(L) for _ in range(reps[i])]
    raise ValueError(f"growth must be 'interleave' or 'stack', got {growth!r}")


class ProgressiveSchedule:
    """Three-phase progressive training schedule (see the module docstring)."""

    def __init__(self, total_steps: int, *, phase1_frac: float = 0.3, phase3_frac: float = 0.2,
                 data_fraction_start: float = 0.1, grow_at=None, grow_to_layers=None,
                 freeze_top_n: Optional[int] = None, keep_trainable: Sequence[str] = (),
                 layers_attr: str = "layers", growth: str = "interleave",
                 init_new_block: Optional[Callable[[nn.Module], None]] = None,
                 copy_optimizer_state: bool = True):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        for name, v in (("phase1_frac", phase1_frac), ("phase3_frac", phase3_frac)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if phase1_frac + phase3_frac > 1.0:
            raise ValueError(f"phase1_frac + phase3_frac must be <= 1, got {phase1_frac} + {phase3_frac}")
        if not 0.0 < data_fraction_start <= 1.0:
            raise ValueError(f"data_fraction_start must be in (0, 1], got {data_fraction_start}")
        if growth not in ("interleave", "stack"):
            raise ValueError(f"growth must be 'interleave' or 'stack', got {growth!r}")
        if freeze_top_n is not None and (not isinstance(freeze_top_n, int) or freeze_top_n < 1):
            raise ValueError(f"freeze_top_n must be a positive int or None, got {freeze_top_n!r}")
        self.total_steps = total_steps
        self.phase1_end = round(phase1_frac * total_steps)
        self.phase3_start = total_steps - round(phase3_frac * total_steps)
        self.data_fraction_start = data_fraction_start
        if grow_to_layers is None:
            if grow_at is not None:
                raise ValueError("grow_at needs grow_to_layers")
            self.grow_at, self.grow_to = [], []
        else:
            to = [grow_to_layers] if isinstance(grow_to_layers, int) else list(grow_to_layers)
            at = [self.phase1_end] if grow_at is None else ([grow_at] if isinstance(grow_at, int) else list(grow_at))
            if len(at) != len(to):
                raise ValueError(f"grow_at and grow_to_layers must have the same length, got {at} and {to}")
            if any(not isinstance(s, int) or not 0 < s < total_steps for s in at) or at != sorted(set(at)):
                raise ValueError(f"grow_at must be increasing steps in (0, total_steps={total_steps}), got {at}")
            if any(not isinstance(n, int) or n < 1 for n in to) or to != sorted(set(to)):
                raise ValueError(f"grow_to_layers must be increasing positive ints, got {to}")
            self.grow_at, self.grow_to = at, to
        self.freeze_top_n, self.keep_trainable = freeze_top_n, tuple(keep_trainable)
        self.layers_attr, self.growth = layers_attr, growth
        self.init_new_block, self.copy_optimizer_state = init_new_block, copy_optimizer_state
        self.step = 0
        self.grows_done = 0
        self.frozen = False
        self.history: List[dict] = []

    # ---- where we are
    def on_step(self, step: int) -> int:
        """Tell the schedule the current step; returns the phase."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.step = step
        return self.phase

    @property
    def phase(self) -> int:
        if self.step < self.phase1_end:
            return 1
        if self.step < self.phase3_start:
            return 2
        return 3

    def data_fraction(self) -> float:
        """Fraction of the dataset the loop should sample from at this step."""
        if self.phase == 1:
            return self.data_fraction_start
        if self.phase == 3:
            return 1.0
        span = self.phase3_start - self.phase1_end
        t = (self.step - self.phase1_end) / span
        return self.data_fraction_start + (1.0 - self.data_fraction_start) * t

    def state_dict(self) -> dict:
        return {"step": self.step, "grows_done": self.grows_done, "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.grows_done, self.frozen = state["step"], state["grows_done"], state["frozen"]

    # ---- what to train
    def _layers(self, model) -> nn.ModuleList:
        layers = _get_attr(model, self.layers_attr)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"model.{self.layers_attr} must be an nn.ModuleList, got {type(layers).__name__}")
        return layers

    def _trainable_ids(self, model) -> Optional[set]:
        if not self.frozen:
            return None
        layers = self._layers(model)
        keep = {id(p) for blk in layers[len(layers) - self.freeze_top_n:] for p in blk.parameters()}
        keep |= {id(p) for name, p in model.named_parameters(remove_duplicate=False)
                 if self.keep_trainable and name.startswith(self.keep_trainable)}
        return keep

    def trainable_parameters(self, model: nn.Module) -> List[nn.Parameter]:
        """The parameters to optimise now (each once, even when shared)."""
        keep = self._trainable_ids(model)
        return [p for p in model.parameters() if keep is None or id(p) in keep]

    # ---- transitions
    def maybe_grow(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Apply the growth steps and the phase-3 freeze that are due at the
        current step; returns True when the model or its trainable set changed."""
        changed = False
        while self.grows_done < len(self.grow_at) and self.step >= self.grow_at[self.grows_done]:
            self.grow(model, optimizer, self.grow_to[self.grows_done])
            self.grows_done += 1
            changed = True
        if self.freeze_top_n is not None and not self.frozen and self.phase == 3:
            self.freeze(model, optimizer)
            changed = True
        return changed

    def grow(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], num_layers: int) -> List[int]:
        """Deepen ``model.<layers_attr>`` to num_layers blocks now; returns the order used."""
        layers = self._layers(model)
        order = growth_order(len(layers), num_layers, self.growth)
        prefix = self.layers_attr + "."
        # Objects a copy must share rather than duplicate: anything that appears in
        # more than one block, or outside the block list.
        count: dict = {}
        objects: dict = {}
        for blk in layers:
            ids = set()
            for obj in [*blk.modules(), *blk.parameters(), *blk.buffers()]:
                ids.add(id(obj))
                objects[id(obj)] = obj
            for i in ids:
                count[i] = count.get(i, 0) + 1
        shared = {i for i, c in count.items() if c > 1}
        for name, obj in [*model.named_modules(remove_duplicate=False),
                          *model.named_parameters(remove_duplicate=False),
                          *model.named_buffers(remove_duplicate=False)]:
            if name and not (name + ".").startswith(prefix) and id(obj) in objects:
                shared.add(id(obj))
        groups = {}
        if optimizer is not None:
            for g in optimizer.param_groups:
                for p in g["params"]:
                    groups[id(p)] = g
        seen, new_blocks = set(), []
        for i in order:
            src = layers[i]
            if i not in seen:
                seen.add(i)
                new_blocks.append(src)
                continue
            memo = {k: objects[k] for k in shared}
            dup = copy.deepcopy(src, memo)
            if self.init_new_block is not None:
                self.init_new_block(dup)
            if optimizer is not None:
                src_params = dict(src.named_parameters(remove_duplicate=False))
                for name, p in dup.named_parameters(remove_duplicate=False):
                    q = src_params[name]
                    if p is q or id(q) not in groups:  # shared with the source, or not optimised
                        continue
                    groups[id(q)]["params"].append(p)
                    groups[id(p)] = groups[id(q)]
                    if self.copy_optimizer_state and q in optimizer.state:
                        optimizer.state[p] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                                              for k, v in optimizer.state[q].items()}
            new_blocks.append(dup)
        _set_attr(model, self.layers_attr, nn.ModuleList(new_blocks))
        if self.frozen:  # growing after the freeze: re-apply it to the new depth
            self.freeze(model, optimizer)
        self.history.append({"step": self.step, "event": "grow", "layers": num_layers, "order": order})
        return order

    def freeze(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Freeze all but the top freeze_top_n blocks (and keep_trainable) now;
        returns the number of parameters (tensors) frozen."""
        if self.freeze_top_n is None:
            raise ValueError("freeze_top_n is None: nothing to freeze")
        self.frozen = True
        keep = self._trainable_ids(model)
        frozen = 0
        for p in model.parameters():
            if id(p) not in keep:
                frozen += p.requires_grad
                p.requires_grad_(False)
                p.grad = None
        if optimizer is not None:
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if id(p) not in keep:
                        optimizer.state.pop(p, None)
                g["params"] = [p for p in g["params"] if id(p) in keep]
        self.history.append({"step": self.step, "event": "freeze", "frozen_tensors": frozen})
        return frozen


class FractionSampler(Sampler[int]):
    """An endless random sampler over the first ``ceil(fraction * n)`` entries of
    a fixed random permutation of ``range(n)``, the fraction read from
    ``schedule.data_fraction()`` at every draw: phase 1 sees a fixed random 10%
    subset, which grows in phase 2 (the subset only ever gains samples)."""

    def __init__(self, num_samples: int, schedule: ProgressiveSchedule, *, seed: int = 0):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.n, self.schedule, self.seed = num_samples, schedule, seed
        self.perm = np.random.default_rng(seed).permutation(num_samples)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, 1))
        while True:
            k = max(1, math.ceil(self.schedule.data_fraction() * self.n))
            yield int(self.perm[rng.integers(k)])
