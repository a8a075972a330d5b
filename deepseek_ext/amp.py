"""Dynamic loss scaling that never makes the host wait inside a step.

:class:`DynamicLossScaler` is a subclass of ``torch.amp.GradScaler`` with the
same constructor, methods, ``state_dict`` keys and results: with
``hysteresis=1`` and the scale inside its bounds it produces GradScaler's scale
sequence and skips the same steps, for any ``growth_factor``/``backoff_factor``
GradScaler accepts. It adds hysteresis, a minimum and maximum scale, a
``skipped_steps`` counter on the device, and an error when training is stuck
skipping steps at the minimum scale.

Differences that matter:

* The whole state machine runs on the device. With power-of-two factors and
  scale (the defaults) it is one exact kernel
  (``torch.ops.deepseek_ext.update_scale_``); otherwise a few device ops that
  compute GradScaler's rule (the product in float64, rounded to float32). With
  optimizers that take ``found_inf`` (torch's fused Adam/AdamW/SGD, any
  optimizer with ``_step_supports_amp_scaling``) a step makes **zero** host
  syncs; with any other optimizer exactly one (the ``found_inf`` read that
  decides whether to step).
* Gradients are unscaled and checked in one pass by ``unscale_and_check_``
  (float32, float16 and bfloat16 gradients alike; for sparse gradients their
  values). Weight gradients that :class:`deepseek_ext.nn.Linear` already
  produced unscaled (its backward GEMM multiplies by ``1/scale`` and flags
  overflow in the same kernel) are not touched again.
* Under FSDP2 (parameters are DTensors) ``found_inf`` is reduced (MAX) over the
  parameters' device mesh, so every rank skips the same steps, as torch's
  ``ShardedGradScaler`` does.
* One ``found_inf`` per step is shared by all optimizers stepped with the
  scaler (an overflow seen before an optimizer steps skips it), on one device.
* Defaults that GradScaler does not have: ``min_scale=1``, ``max_scale=2**24``
  (the scale, ``init_scale`` and ``update(new_scale)`` included, is kept in
  these bounds) and :class:`LossScaleStuckError` after 50 skipped steps in a
  row at ``min_scale``.
* :class:`deepseek_ext.nn.Linear` produces its weight gradient unscaled: do not
  tie its weight to another module (e.g. an embedding shared with the output
  layer), whose share of the gradient would still be scaled. The scaler only
  affects backward passes between its ``scale()`` and ``update()``.

bfloat16 has float32's exponent range and needs no loss scaling:
``DynamicLossScaler.for_dtype(torch.bfloat16)`` returns a disabled scaler.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
import weakref
from collections import abc, defaultdict
from typing import Any, Dict, List, Optional

import torch
from torch.amp.grad_scaler import OptState

from deepseek_ext import ops

__all__ = ["DynamicLossScaler", "LossScaleStuckError", "active_scaler"]

# The stuck-at-min_scale check reads a copy of the skip counter every this many
# updates (never the live device tensor, so never a sync).
_STUCK_CHECK_EVERY = 8

_ACTIVE: Optional["weakref.ReferenceType[DynamicLossScaler]"] = None


def active_scaler() -> Optional["DynamicLossScaler"]:
    """The enabled scaler whose ``scale()`` ran last, if it is still alive.

    :class:`deepseek_ext.nn.Linear` uses it in backward to unscale its weight
    gradient inside the GEMM."""
    s = _ACTIVE() if _ACTIVE is not None else None
    return s if s is not None and s._enabled and s._scale is not None else None


class LossScaleStuckError(RuntimeError):
    """Raised when too many steps in a row were skipped at ``min_scale``."""


def _is_pow2(x: float) -> bool:
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


def _refresh_per_optimizer_state() -> Dict[str, Any]:
    # A module-level factory (not a lambda) keeps the defaultdict picklable, as in GradScaler.
    return {"stage": OptState.READY, "found_inf_per_device": {}}


def _check_growth_factor(value, name="growth_factor") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 1.0):
        raise ValueError(f"{name} must be a finite number > 1, got {value!r}")
    return float(value)


def _check_backoff_factor(value, name="backoff_factor") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_growth_interval(value, name="growth_interval") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value < 2**31:
        raise ValueError(f"{name} must be a positive int (< 2**31), got {value!r}")
    return int(value)


def _check_scale_value(value, name) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class DynamicLossScaler(torch.amp.GradScaler):
    """Dynamic loss scaler whose state lives on the device; a ``torch.amp.GradScaler``.

    Args:
        device: device type of the scale and counters (default ``"cuda"``, as
            GradScaler). ``"cuda"`` on a machine without CUDA warns and disables
            the scaler, as GradScaler does.
        init_scale, growth_factor, backoff_factor, growth_interval, enabled:
            as in ``torch.amp.GradScaler`` (``init_scale`` is clamped to the
            bounds). Any ``growth_factor > 1`` and ``0 < backoff_factor < 1``;
            powers of two (the defaults) take the exact one-kernel path.
        hysteresis: overflows tolerated before the scale backs off (1 = back off
            on every overflow, as GradScaler); refilled when the scale grows.
        min_scale, max_scale: bounds, powers of two.
        max_skips_at_min_scale: raise :class:`LossScaleStuckError` once this many
            consecutive steps were skipped while the scale sat at ``min_scale``
            (read from a copy every 8 updates, one update late: never a sync).
            ``None`` disables the check.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        hysteresis: int = 1,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        max_skips_at_min_scale: Optional[int] = 50,
    ) -> None:
        # GradScaler.__init__ is not called: it would reject factors with an
        # AssertionError and name itself in its warning. Every attribute it sets
        # is set here, with the same meaning.
        growth_factor = _check_growth_factor(growth_factor)
        backoff_factor = _check_backoff_factor(backoff_factor)
        growth_interval = _check_growth_interval(growth_interval)
        if isinstance(hysteresis, bool) or not (isinstance(hysteresis, numbers.Integral) and 0 < hysteresis < 2**31):
            raise ValueError(f"hysteresis must be a positive int, got {hysteresis!r}")
        if not _is_pow2(min_scale):
            raise ValueError(f"min_scale must be a finite power of two > 0, got {min_scale}")
        if not (_is_pow2(max_scale) and max_scale <= 2.0**127):
            raise ValueError(f"max_scale must be a power of two <= 2**127, got {max_scale}")
        if min_scale > max_scale:
            raise ValueError(f"min_scale ({min_scale}) must be <= max_scale ({max_scale})")
        init_scale = _check_scale_value(init_scale, "init_scale")
        if max_skips_at_min_scale is not None and max_skips_at_min_scale < 1:
            raise ValueError(f"max_skips_at_min_scale must be >= 1 or None, got {max_skips_at_min_scale}")
        if not isinstance(device, (str, torch.device)):
            raise ValueError(f"device must be a device type such as 'cuda' or 'cpu', got {device!r}")
        self._device = device
        self._enabled = bool(enabled)
        if self._enabled and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            warnings.warn("DynamicLossScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=2)
            self._enabled = False
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._hysteresis = int(hysteresis)
        self._min_scale = float(min_scale)
        self._max_scale = float(max_scale)
        self._max_skips_at_min = max_skips_at_min_scale
        # Values the device tensors start from (GradScaler's _init_scale and
        # _init_growth_tracker, and ours): set by the constructor, load_state_dict
        # and unpickling, used by the first scale().
        self._init_scale = self._clamp(init_scale)
        self._init_growth_tracker = 0
        self._init_hysteresis_tracker = self._hysteresis
        self._init_skip_counts = [0, 0]
        self._scale: Optional[torch.Tensor] = None  # float32[1]
        self._inv_scale: Optional[torch.Tensor] = None
        self._growth_tracker: Optional[torch.Tensor] = None  # int32[1]
        self._hysteresis_tracker: Optional[torch.Tensor] = None  # int32[1]
        self._skip_counts: Optional[torch.Tensor] = None  # int64[2]: consecutive, total
        self._found_inf: Optional[torch.Tensor] = None  # float32[1]
        self._one: Optional[torch.Tensor] = None  # float32[1] 1.0: inv_scale of a check-only pass
        # Whether the scale is known (on the host) to be a power of two: with
        # power-of-two factors it then stays one, and update_scale_ is exact.
        self._scale_is_pow2 = _is_pow2(self._init_scale)
        self._per_optimizer_states: Dict[int, Dict[str, Any]] = defaultdict(_refresh_per_optimizer_state)
        self._pre_unscaled: Dict[int, torch.nn.Parameter] = {}
        self._watch = None  # (skip counts, scale, CUDA event or None) copied at a recent update
        self._updates = 0

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, device: str = "cuda", **kwargs) -> "DynamicLossScaler":
        """A scaler for training in ``dtype``: enabled for float16 only."""
        return cls(device, enabled=(dtype == torch.float16) and kwargs.pop("enabled", True), **kwargs)

    # -- state -----------------------------------------------------------
    def _clamp(self, x: float) -> float:
        return min(max(float(x), self._min_scale), self._max_scale)

    def _lazy_init(self, device: torch.device) -> None:
        if self._scale is not None:
            return
        self._scale = torch.full((1,), self._init_scale, dtype=torch.float32, device=device)
        self._inv_scale = torch.reciprocal(self._scale.double()).float()
        self._growth_tracker = torch.full((1,), self._init_growth_tracker, dtype=torch.int32, device=device)
        self._hysteresis_tracker = torch.full((1,), self._init_hysteresis_tracker, dtype=torch.int32, device=device)
        self._skip_counts = torch.tensor(self._init_skip_counts, dtype=torch.int64, device=device)
        self._found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self._one = torch.ones(1, dtype=torch.float32, device=device)

    def _lazy_init_scale_growth_tracker(self, dev) -> None:
        """GradScaler's hook for creating the state before the first ``scale()``
        (Accelerate calls it after ``load_state_dict``)."""
        self._lazy_init(torch.device(dev))

    def _check_scale_growth_tracker(self, funcname: str):
        if self._scale is None or self._growth_tracker is None:
            raise RuntimeError(f"{funcname}() called before scale(): no loss has been scaled yet (use "
                               "scaler.scale(loss).backward() earlier in the iteration)")
        return self._scale, self._growth_tracker

    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def found_inf(self) -> Optional[torch.Tensor]:
        """float32[1] on the device: 1.0 if this step's gradients overflowed so far."""
        return self._found_inf

    @property
    def skipped_steps(self) -> torch.Tensor:
        """Total skipped steps, as a device tensor (reading it does not sync)."""
        if self._skip_counts is None:
            return torch.tensor(self._init_skip_counts[1], dtype=torch.int64)
        return self._skip_counts[1]

    @property
    def consecutive_skipped_steps(self) -> torch.Tensor:
        if self._skip_counts is None:
            return torch.tensor(self._init_skip_counts[0], dtype=torch.int64)
        return self._skip_counts[0]

    def get_scale(self) -> float:
        """The current scale as a Python float (this reads the device: a sync)."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def get_scale_tensor(self) -> Optional[torch.Tensor]:
        return self._scale

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        """Sets the factor the scale grows by after ``growth_interval`` clean steps (> 1)."""
        self._growth_factor = _check_growth_factor(new_factor, "new_factor")

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        """Sets the factor the scale backs off by after an overflow (in (0, 1))."""
        self._backoff_factor = _check_backoff_factor(new_factor, "new_factor")

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        """Sets the number of clean steps in a row after which the scale grows."""
        self._growth_interval = _check_growth_interval(new_interval, "new_interval")

    def _get_growth_tracker(self) -> int:
        if not self._enabled:
            return 0
        return self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker.item())

    # -- the step --------------------------------------------------------
    def scale(self, outputs):
        """Multiplies a tensor (or an iterable of tensors, recursively) by the scale.

        16-bit tensors are scaled in float32 (the result is float32): 2**16 itself
        does not fit float16."""
        global _ACTIVE
        if not self._enabled:
            _ACTIVE = None  # no scaler of an earlier run may touch this backward
            return outputs

        def apply(val):
            if isinstance(val, torch.Tensor):
                self._lazy_init(val.device)
                s = self._scale.view(()).to(val.device, non_blocking=True)
                return val * s if val.dtype in (torch.float32, torch.float64) else val.float() * s
            if isinstance(val, abc.Iterable):
                scaled = map(apply, val)
                return type(val)(scaled) if isinstance(val, (list, tuple)) else scaled
            raise ValueError(f"outputs must be a Tensor or an iterable of Tensors, got {type(val).__name__}")

        result = apply(outputs)
        if self._scale is not None:
            _ACTIVE = weakref.ref(self)
        return result

    def _mark_unscaled(self, param: torch.nn.Parameter) -> None:
        """Called by deepseek_ext.nn.Linear: param.grad was produced unscaled and
        already checked into found_inf."""
        self._pre_unscaled[id(param)] = param

    def _pre_unscaled_ids(self, optimizer: torch.optim.Optimizer) -> set:
        """Ids of the optimizer's parameters whose gradients our Linear produced
        unscaled. Under FSDP2 the Linear saw the unsharded parameter; its
        gradient was reduce-scattered (still unscaled) into the sharded one."""
        if not self._pre_unscaled:
            return set()
        ids = set(self._pre_unscaled)
        mapping = _fsdp2_unsharded_to_sharded()
        ids.update(id(mapping[u]) for u in self._pre_unscaled if u in mapping)
        if not mapping and any(_is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
            # FSDP2 parameters, but its registry could not be read (another torch
            # version): the sharded gradients would be unscaled a second time.
            raise RuntimeError("deepseek_ext.nn.Linear produced unscaled gradients for parameters the scaler cannot "
                               "match to the optimizer's FSDP2 (DTensor) parameters with this torch version; use "
                               "torch.nn.Linear in FSDP2-sharded models")
        return ids

    def _check_grads(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor) -> None:
        """Multiplies the optimizer's gradients by ``inv_scale`` (1: only reads
        them) and flags inf/NaN into found_inf, in one pass; then agrees on
        found_inf across the ranks that must skip together."""
        skip = self._pre_unscaled_ids(optimizer)
        grads: List[torch.Tensor] = []
        meshes = {}
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if _is_dtensor(p):
                        meshes[id(p.device_mesh)] = p.device_mesh
                    if p.grad is None or id(p) in skip:
                        continue
                    g = p.grad
                    if _is_dtensor(g):
                        g = g.to_local()  # this rank's shard, the same storage
                    if g.is_sparse:
                        # Duplicate indices are summed by coalesce(); for scaled
                        # float16 values that sum may overflow, so check it (as GradScaler does).
                        if g.dtype == torch.float16:
                            p.grad = g = g.coalesce()
                        g = g._values()
                    if g.device != self._scale.device:
                        raise ValueError(f"all gradients must be on the scaler's device ({self._scale.device}), "
                                         f"got one on {g.device}")
                    grads.append(g)
            ops.unscale_and_check_(grads, self._found_inf, inv_scale)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        if meshes:
            # FSDP2: every rank checked only its own shards. MAX over every
            # dimension of the mesh is MAX over all of its ranks.
            for mesh in meshes.values():
                for dim in range(mesh.ndim):
                    dist.all_reduce(self._found_inf, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        elif self._pre_unscaled and dist.get_world_size() > 1:
            # Gradients our Linear unscaled were checked by this rank's GEMM before
            # DDP averaged them: agree on found_inf across ranks, or one rank could
            # step on another rank's inf. Asynchronous on NCCL: no host sync.
            dist.all_reduce(self._found_inf, op=dist.ReduceOp.MAX)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divides the optimizer's gradients by the scale (in place) and records
        overflow, in one pass; gradients produced unscaled by our Linear are skipped."""
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        self._check_grads(optimizer, self._inv_scale)
        state["found_inf_per_device"] = {self._scale.device: self._found_inf}
        state["stage"] = OptState.UNSCALED

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> Dict[torch.device, torch.Tensor]:
        """GradScaler's check-only pass, for optimizers that unscale in their step."""
        self._check_scale_growth_tracker("_check_inf_per_device")
        self._check_grads(optimizer, self._one)
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {self._scale.device: self._found_inf}
        return state["found_inf_per_device"]

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Steps the optimizer unless this step's gradients overflowed.

        Optimizers that declare ``_step_supports_amp_scaling`` (e.g.
        ``torch.optim.AdamW(fused=True)``) get GradScaler's protocol: the
        attributes ``grad_scale`` (the scale, or None once the gradients are
        unscaled) and ``found_inf`` during their ``step``, and skip on the
        device: no sync. Others are stepped after one read of ``found_inf``."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if DynamicLossScaler is enabled.")
        self._check_scale_growth_tracker("step")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        retval = None
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            if "grad_scaler" in inspect.signature(optimizer.step).parameters:
                # GradScaler's older protocol, deprecated there with the same warning.
                warnings.warn(
                    "GradScaler is going to stop passing itself as a keyword argument to the passed "
                    "optimizer. In the near future GradScaler registers `grad_scale: Tensor` and "
                    "`found_inf: Tensor` to the passed optimizer and let the optimizer use them directly.",
                    FutureWarning, stacklevel=2)
                kwargs["grad_scaler"] = self
                retval = optimizer.step(*args, **kwargs)
                state["stage"] = OptState.STEPPED
                return retval
            if state["stage"] is OptState.READY:
                pre = self._pre_unscaled_ids(optimizer)
                if pre and any(id(p) in pre for g in optimizer.param_groups for p in g["params"]):
                    # Some gradients are unscaled already (our Linear): one
                    # grad_scale cannot serve all, so unscale the others here.
                    self.unscale_(optimizer)
                else:
                    self._check_inf_per_device(optimizer)  # the optimizer unscales in its kernel
            if state["stage"] is OptState.UNSCALED:
                grad_scale = getattr(optimizer, "grad_scale", None)
            else:
                grad_scale = self._scale.view(()) * getattr(optimizer, "grad_scale", 1)
            optimizer.grad_scale = grad_scale
            optimizer.found_inf = self._found_inf.view(())  # fused optimizers want 0-dim tensors
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale
                del optimizer.found_inf
        else:
            if state["stage"] is OptState.READY:
                self.unscale_(optimizer)
            if not bool(self._found_inf.item()):  # the one host sync of such a step
                retval = optimizer.step(*args, **kwargs)
        state["stage"] = OptState.STEPPED
        return retval

    def update(self, new_scale=None) -> None:
        """Advances the scale state machine on the device and starts a new step.

        ``new_scale`` (a float, or a one-element tensor on the scaler's device
        type without ``requires_grad``, as GradScaler takes) sets the scale
        instead, clamped to ``[min_scale, max_scale]``."""
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE() is self:
            _ACTIVE = None  # until the next scale(), Linear backward leaves gradients alone
        if not self._enabled or self._scale is None:
            return
        self._check_not_stuck()
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if (new_scale.device.type != self._scale.device.type or new_scale.numel() != 1
                        or new_scale.requires_grad):
                    raise ValueError(
                        "new_scale must be a float or a one-element tensor on the scaler's device type "
                        f"({self._scale.device.type}) with requires_grad=False, got shape "
                        f"{tuple(new_scale.shape)} on {new_scale.device} (requires_grad={new_scale.requires_grad})")
                self._scale.copy_(new_scale.detach().reshape(1)).clamp_(self._min_scale, self._max_scale)
                self._scale_is_pow2 = False  # unknown without reading it
            else:
                value = self._clamp(_check_scale_value(new_scale, "new_scale"))
                self._scale.fill_(value)
                self._scale_is_pow2 = _is_pow2(value)
        elif self._scale_is_pow2 and _is_pow2(self._growth_factor) and _is_pow2(self._backoff_factor):
            ops.update_scale_(self._scale, self._growth_tracker, self._hysteresis_tracker, self._skip_counts,
                              self._found_inf, self._growth_factor, self._backoff_factor, self._growth_interval,
                              self._hysteresis, self._min_scale, self._max_scale)
        else:
            self._update_scale_any_factor()
        if self._scale_is_pow2:
            torch.reciprocal(self._scale, out=self._inv_scale)  # exact for a power of two
        else:
            # As GradScaler: the reciprocal in float64, rounded to float32.
            self._inv_scale.copy_(torch.reciprocal(self._scale.double()))
        self._found_inf.zero_()
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        self._pre_unscaled.clear()
        self._start_watch()

    def _update_scale_any_factor(self) -> None:
        """update_scale_'s rule for any factors, in device ops (no sync): the
        product in float64 rounded to float32, as torch._amp_update_scale_
        computes it, then clamped to the bounds."""
        found = self._found_inf > 0
        hyst = torch.where(found, (self._hysteresis_tracker - 1).clamp_(min=0), self._hysteresis_tracker)
        back_off = found & (hyst == 0)
        successful = self._growth_tracker + 1
        grow = ~found & (successful >= self._growth_interval)
        s = self._scale.double()
        new = torch.where(back_off, s * self._backoff_factor, torch.where(grow, s * self._growth_factor, s))
        self._scale.copy_(new.float().clamp_(self._min_scale, self._max_scale))
        self._growth_tracker.copy_(torch.where(found | grow, 0, successful))
        self._hysteresis_tracker.copy_(torch.where(grow, self._hysteresis, hyst))
        consecutive = torch.where(found, self._skip_counts[:1] + 1, 0)
        self._skip_counts.copy_(torch.cat([consecutive, self._skip_counts[1:] + found]))
        # A power-of-two scale times power-of-two factors stays one, within the bounds.
        self._scale_is_pow2 = self._scale_is_pow2 and _is_pow2(self._growth_factor) and _is_pow2(
            self._backoff_factor)

    # -- the stuck check, one step late and without a sync -----------------
    def _start_watch(self) -> None:
        self._updates += 1
        if self._max_skips_at_min is None or self._updates % _STUCK_CHECK_EVERY != 0:
            return
        if self._scale.device.type == "cuda":
            if self._watch is None:
                self._watch = (torch.empty(2, dtype=torch.int64, pin_memory=True),
                               torch.empty(1, dtype=torch.float32, pin_memory=True), torch.cuda.Event())
            skips, scale, event = self._watch
            skips.copy_(self._skip_counts, non_blocking=True)
            scale.copy_(self._scale, non_blocking=True)
            event.record()
        else:
            self._watch = (self._skip_counts.clone(), self._scale.clone(), None)

    def _check_not_stuck(self) -> None:
        if self._watch is None or self._updates % _STUCK_CHECK_EVERY != 0:
            return
        skips, scale, event = self._watch
        if event is not None and not event.query():
            return  # the copy has not landed yet: check at a later step
        consecutive = int(skips[0])
        if consecutive >= self._max_skips_at_min and float(scale[0]) <= self._min_scale:
            raise LossScaleStuckError(
                f"{consecutive} optimizer steps in a row were skipped for inf/NaN gradients while the loss "
                f"scale sat at min_scale={self._min_scale}: the non-finite values do not come from the "
                "loss scale (check the inputs, the learning rate, or a NaN produced in the forward pass)")

    # -- checkpoints and copies ---------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """GradScaler's keys (``scale``, ``growth_factor``, ``backoff_factor``,
        ``growth_interval``, ``_growth_tracker``) and ours. Reads the device."""
        if not self._enabled:
            return {}
        sd = {
            "scale": self.get_scale(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._get_growth_tracker(),
            "hysteresis": self._hysteresis,
            "min_scale": self._min_scale,
            "max_scale": self._max_scale,
            "_hysteresis_tracker": self._init_hysteresis_tracker,
            "_skip_counts": list(self._init_skip_counts),
        }
        if self._scale is not None:
            sd["_hysteresis_tracker"] = int(self._hysteresis_tracker.item())
            sd["_skip_counts"] = [int(v) for v in self._skip_counts.tolist()]
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads ours or GradScaler's ``state_dict`` (keys only ours has keep
        their current values). Before the first ``scale()`` it only records the
        values, as GradScaler does: no device is touched."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled "
                               "instance of DynamicLossScaler.")
        growth_factor = _check_growth_factor(state_dict["growth_factor"], "state_dict['growth_factor']")
        backoff_factor = _check_backoff_factor(state_dict["backoff_factor"], "state_dict['backoff_factor']")
        growth_interval = _check_growth_interval(state_dict["growth_interval"], "state_dict['growth_interval']")
        min_scale = float(state_dict.get("min_scale", self._min_scale))
        max_scale = float(state_dict.get("max_scale", self._max_scale))
        if not (_is_pow2(min_scale) and _is_pow2(max_scale) and min_scale <= max_scale <= 2.0**127):
            raise ValueError(f"state_dict['min_scale'] and ['max_scale'] must be powers of two with min <= max, got "
                             f"{min_scale} and {max_scale}")
        scale = _check_scale_value(state_dict["scale"], "state_dict['scale']")
        self._growth_factor, self._backoff_factor = growth_factor, backoff_factor
        self._growth_interval = growth_interval
        self._min_scale, self._max_scale = min_scale, max_scale
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        self._init_scale = self._clamp(scale)
        self._scale_is_pow2 = _is_pow2(self._init_scale)
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        self._init_hysteresis_tracker = int(state_dict.get("_hysteresis_tracker", self._hysteresis))
        self._init_skip_counts = [int(v) for v in state_dict.get("_skip_counts", [0, 0])]
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._inv_scale.copy_(torch.reciprocal(self._scale.double()))
            self._growth_tracker.fill_(self._init_growth_tracker)
            self._hysteresis_tracker.fill_(self._init_hysteresis_tracker)
            self._skip_counts.copy_(torch.tensor(self._init_skip_counts, dtype=torch.int64))
            self._found_inf.zero_()

    def __getstate__(self) -> Dict[str, Any]:
        """As GradScaler: only between iterations; the device state is read into
        the ``_init_*`` values and rebuilt by the first ``scale()`` after
        unpickling. Nothing device-bound (tensors, a CUDA event) is pickled."""
        state = self.__dict__.copy()
        if self._enabled and (len(self._per_optimizer_states) != 0 or self._pre_unscaled):
            raise RuntimeError("A DynamicLossScaler instance may only be pickled at the beginning of an iteration, "
                               "or at the end after scaler.update().")
        if self._scale is not None:
            state["_init_scale"] = float(self._scale.item())
            state["_init_growth_tracker"] = int(self._growth_tracker.item())
            state["_init_hysteresis_tracker"] = int(self._hysteresis_tracker.item())
            state["_init_skip_counts"] = [int(v) for v in self._skip_counts.tolist()]
            state["_scale_is_pow2"] = _is_pow2(state["_init_scale"])
        for name in ("_scale", "_inv_scale", "_growth_tracker", "_hysteresis_tracker", "_skip_counts", "_found_inf",
                     "_one", "_watch"):
            state[name] = None
        state["_pre_unscaled"] = {}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)


def _is_dtensor(t) -> bool:
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def _fsdp2_unsharded_to_sharded() -> Dict[int, torch.nn.Parameter]:
    """{id(unsharded parameter): sharded parameter} of every FSDP2-managed
    parameter alive in this process. FSDP2 keeps no link from the unsharded
    parameter a module computes with back to the sharded one the optimizer
    holds; its module-state registry has both."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        return {}
    out = {}
    for ref in list(_module_state_mapping.values()):
        st = ref() if isinstance(ref, weakref.ReferenceType) else ref
        group = getattr(st, "_fsdp_param_group", None) if isinstance(st, FSDPState) else None
        for fp in getattr(group, "fsdp_params", ()) if group is not None else ():
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                out[id(unsharded)] = fp.sharded_param
    return out
