"""Dynamic loss scaling that never makes the host wait inside a step.

:class:`DynamicLossScaler` is API-compatible with ``torch.amp.GradScaler``
(``scale``, ``unscale_``, ``step``, ``update``, ``get_scale``, ``is_enabled``,
``state_dict``, ``load_state_dict``; same defaults) and adds hysteresis, a
minimum and maximum scale, a ``skipped_steps`` counter on the device, and an
error when training is stuck skipping steps at the minimum scale.

Differences that matter:

* The whole state machine runs on the device (``torch.ops.deepseek_ext.update_scale_``):
  with optimizers that take ``found_inf`` (torch's fused Adam/AdamW/SGD) a step
  makes **zero** host syncs; with any other optimizer exactly one (the
  ``found_inf`` read that decides whether to step).
* Gradients are unscaled and checked in one pass by ``unscale_and_check_``
  (float32, float16 and bfloat16 gradients alike). Weight gradients that
  :class:`deepseek_ext.nn.Linear` already produced unscaled (its backward GEMM
  multiplies by ``1/scale`` and flags overflow in the same kernel) are not
  touched again.
* The scale is always a power of two in ``[min_scale, max_scale]``.
* One ``found_inf`` per step is shared by all optimizers stepped with the
  scaler (an overflow seen before an optimizer steps skips it), on one device.
* Defaults that GradScaler does not have: ``min_scale=1``, ``max_scale=2**24``,
  power-of-two ``growth_factor``/``backoff_factor`` only, and
  :class:`LossScaleStuckError` after 50 skipped steps in a row at ``min_scale``.
* :class:`deepseek_ext.nn.Linear` produces its weight gradient unscaled: do not
  tie its weight to another module (e.g. an embedding shared with the output
  layer), whose share of the gradient would still be scaled. The scaler only
  affects backward passes between its ``scale()`` and ``update()``.

bfloat16 has float32's exponent range and needs no loss scaling:
``DynamicLossScaler.for_dtype(torch.bfloat16)`` returns a disabled scaler.
"""

from __future__ import annotations

import enum
import math
import weakref
from typing import Any, Dict, Iterable, Optional

import torch

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


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _is_pow2(x: float) -> bool:
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


class DynamicLossScaler:
    """Dynamic loss scaler whose state lives on the device.

    Args:
        device: device of the scale and counters (default ``"cuda"``, as GradScaler).
        init_scale, growth_factor, backoff_factor, growth_interval, enabled:
            as in ``torch.amp.GradScaler`` (``init_scale`` is rounded down to a
            power of two and clamped to the bounds).
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
        # The scale is kept a power of two, so the factors must be powers of two
        # too (a factor of 1.5 would be rounded away and the scale never grow).
        if not (growth_factor > 1.0 and _is_pow2(growth_factor)):
            raise ValueError(f"growth_factor must be a power of two > 1, got {growth_factor}")
        if not (0.0 < backoff_factor < 1.0 and _is_pow2(backoff_factor)):
            raise ValueError(f"backoff_factor must be a power of two in (0, 1), got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval > 0):
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
        if not (isinstance(hysteresis, int) and hysteresis > 0):
            raise ValueError(f"hysteresis must be a positive int, got {hysteresis!r}")
        if not _is_pow2(min_scale):
            raise ValueError(f"min_scale must be a finite power of two > 0, got {min_scale}")
        if not (_is_pow2(max_scale) and max_scale <= 2.0**127):
            raise ValueError(f"max_scale must be a power of two <= 2**127, got {max_scale}")
        if min_scale > max_scale:
            raise ValueError(f"min_scale ({min_scale}) must be <= max_scale ({max_scale})")
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale}")
        if max_skips_at_min_scale is not None and max_skips_at_min_scale < 1:
            raise ValueError(f"max_skips_at_min_scale must be >= 1 or None, got {max_skips_at_min_scale}")
        self._device = torch.device(device)
        self._enabled = enabled
        self._init_scale = 2.0 ** math.floor(math.log2(min(max(init_scale, min_scale), max_scale)))
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._hysteresis = hysteresis
        self._min_scale = float(min_scale)
        self._max_scale = float(max_scale)
        self._max_skips_at_min = max_skips_at_min_scale
        self._scale: Optional[torch.Tensor] = None  # float32[1]
        self._inv_scale: Optional[torch.Tensor] = None
        self._growth_tracker: Optional[torch.Tensor] = None  # int32[1]
        self._hysteresis_tracker: Optional[torch.Tensor] = None  # int32[1]
        self._skip_counts: Optional[torch.Tensor] = None  # int64[2]
        self._found_inf: Optional[torch.Tensor] = None  # float32[1]
        self._stages: Dict[int, _Stage] = {}
        self._pre_unscaled: Dict[int, torch.nn.Parameter] = {}
        self._watch = None  # (pinned skip counts, pinned scale, event) of a recent update
        self._updates = 0

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, device: str = "cuda", **kwargs) -> "DynamicLossScaler":
        """A scaler for training in ``dtype``: enabled for float16 only."""
        return cls(device, enabled=(dtype == torch.float16) and kwargs.pop("enabled", True), **kwargs)

    # -- state -----------------------------------------------------------
    def _lazy_init(self, device: torch.device) -> None:
        if self._scale is not None:
            return
        self._device = device
        self._scale = torch.full((1,), self._init_scale, dtype=torch.float32, device=device)
        self._inv_scale = torch.reciprocal(self._scale)
        self._growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)
        self._hysteresis_tracker = torch.full((1,), self._hysteresis, dtype=torch.int32, device=device)
        self._skip_counts = torch.zeros(2, dtype=torch.int64, device=device)
        self._found_inf = torch.zeros(1, dtype=torch.float32, device=device)

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
            return torch.zeros((), dtype=torch.int64)
        return self._skip_counts[1]

    @property
    def consecutive_skipped_steps(self) -> torch.Tensor:
        if self._skip_counts is None:
            return torch.zeros((), dtype=torch.int64)
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

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    # -- the step --------------------------------------------------------
    def scale(self, outputs):
        """Multiplies a tensor (or an iterable of tensors) by the scale."""
        global _ACTIVE
        if not self._enabled:
            _ACTIVE = None  # no scaler of an earlier run may touch this backward
            return outputs
        if isinstance(outputs, torch.Tensor):
            self._lazy_init(outputs.device)
            _ACTIVE = weakref.ref(self)
            s = self._scale.view(())
            # A float16 loss is scaled in float32: 2**16 itself does not fit float16.
            return outputs * s if outputs.dtype in (torch.float32, torch.float64) else outputs.float() * s
        if isinstance(outputs, Iterable):
            return type(outputs)(self.scale(o) for o in outputs) if not isinstance(outputs, map) else map(
                self.scale, outputs)
        raise TypeError(f"outputs must be a Tensor or an iterable of Tensors, got {type(outputs).__name__}")

    def _mark_unscaled(self, param: torch.nn.Parameter) -> None:
        """Called by deepseek_ext.nn.Linear: param.grad was produced unscaled and
        already checked into found_inf."""
        self._pre_unscaled[id(param)] = param

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divides the optimizer's gradients by the scale (in place) and records
        overflow, in one pass; gradients produced unscaled by our Linear are skipped."""
        if not self._enabled:
            return
        stage = self._stages.get(id(optimizer), _Stage.READY)
        if stage is _Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if stage is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        if self._scale is None:
            raise RuntimeError("unscale_() called before scale(): no loss has been scaled yet")
        grads = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in self._pre_unscaled:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("DynamicLossScaler does not support sparse gradients")
                if p.grad.device != self._scale.device:
                    raise ValueError(
                        f"all gradients must be on the scaler's device ({self._scale.device}), got one on "
                        f"{p.grad.device}")
                grads.append(p.grad)
        ops.unscale_and_check_(grads, self._found_inf, self._inv_scale)
        # Gradients our Linear unscaled were checked by this rank's GEMM before
        # DDP averaged them: agree on found_inf across ranks, or one rank could
        # step on another rank's inf. Asynchronous on NCCL: no host sync.
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1 and self._pre_unscaled:
            torch.distributed.all_reduce(self._found_inf, op=torch.distributed.ReduceOp.MAX)
        self._stages[id(optimizer)] = _Stage.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Steps the optimizer unless this step's gradients overflowed.

        Optimizers that accept ``found_inf`` (``_step_supports_amp_scaling``,
        e.g. ``torch.optim.AdamW(fused=True)``) skip on the device: no sync.
        Others are stepped after one read of ``found_inf``."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if DynamicLossScaler is enabled.")
        if self._stages.get(id(optimizer), _Stage.READY) is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if self._stages.get(id(optimizer), _Stage.READY) is _Stage.READY:
            self.unscale_(optimizer)
        retval = None
        if getattr(optimizer, "_step_supports_amp_scaling", False) and _is_fused(optimizer):
            # Gradients are already unscaled: pass found_inf only.
            optimizer.grad_scale = None
            optimizer.found_inf = self._found_inf.view(())  # fused optimizers want a 0-dim tensor
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale
                del optimizer.found_inf
        elif not bool(self._found_inf.item()):  # the one host sync of a non-fused step
            retval = optimizer.step(*args, **kwargs)
        self._stages[id(optimizer)] = _Stage.STEPPED
        return retval

    def update(self, new_scale=None) -> None:
        """Advances the scale state machine on the device and starts a new step."""
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE() is self:
            _ACTIVE = None  # until the next scale(), Linear backward leaves gradients alone
        if not self._enabled or self._scale is None:
            return
        self._check_not_stuck()
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                self._scale.copy_(new_scale.reshape(1))
            else:
                if not _is_pow2(float(new_scale)):
                    raise ValueError(f"new_scale must be a power of two, got {new_scale}")
                self._scale.fill_(float(new_scale))
        else:
            ops.update_scale_(self._scale, self._growth_tracker, self._hysteresis_tracker, self._skip_counts,
                              self._found_inf, self._growth_factor, self._backoff_factor, self._growth_interval,
                              self._hysteresis, self._min_scale, self._max_scale)
        torch.reciprocal(self._scale, out=self._inv_scale)
        self._found_inf.zero_()
        self._stages.clear()
        self._pre_unscaled.clear()
        self._start_watch()

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

    # -- checkpoints -----------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if not self._enabled:
            return {}
        sd = {
            "scale": self.get_scale(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "hysteresis": self._hysteresis,
            "min_scale": self._min_scale,
            "max_scale": self._max_scale,
            "_growth_tracker": 0,
            "_hysteresis_tracker": self._hysteresis,
            "_skip_counts": [0, 0],
        }
        if self._scale is not None:
            sd["_growth_tracker"] = int(self._growth_tracker.item())
            sd["_hysteresis_tracker"] = int(self._hysteresis_tracker.item())
            sd["_skip_counts"] = [int(v) for v in self._skip_counts.tolist()]
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled "
                               "instance of DynamicLossScaler.")
        self._min_scale = float(state_dict.get("min_scale", self._min_scale))
        self._max_scale = float(state_dict.get("max_scale", self._max_scale))
        loaded = min(max(float(state_dict["scale"]), self._min_scale), self._max_scale)
        self._init_scale = 2.0 ** math.floor(math.log2(loaded))  # a power of two within the bounds
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        if self._scale is None:
            self._lazy_init(self._device)
        self._scale.fill_(self._init_scale)
        torch.reciprocal(self._scale, out=self._inv_scale)
        self._growth_tracker.fill_(int(state_dict["_growth_tracker"]))
        self._hysteresis_tracker.fill_(int(state_dict.get("_hysteresis_tracker", self._hysteresis)))
        self._skip_counts.copy_(torch.tensor(state_dict.get("_skip_counts", [0, 0]), dtype=torch.int64))
        self._found_inf.zero_()


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return any(g.get("fused", False) for g in optimizer.param_groups)
