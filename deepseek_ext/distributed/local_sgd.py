"""Local SGD with an adaptive averaging period, for a DDP model.

During ``warmup_steps`` DDP averages gradients every step (through an inner
hook: a plain allreduce, or :func:`int8_compress_hook`). After it, the hook
sends nothing: each rank steps on its own gradients, and every ``period``
steps :meth:`AdaptiveLocalSGD.step` averages the parameters in one allreduce.

The period adapts at those averaging points. With ``anchor`` the average of
the last averaging point, rank r's update is ``d_r = theta_r - anchor``; one
fp32 allreduce carries ``sum_r d_r`` and ``sum_r |d_r|^2``, from which

    drift = mean_r |d_r - mean d|^2 / |mean d|^2

(how far the ranks wandered apart, relative to the progress they agree on).
``drift < grow_below`` doubles the period, ``drift > shrink_above`` halves it,
within ``[min_period, max_period]``. Every rank computes this from the same
reduced numbers, so they agree without any extra message; the host reads the
one number once per averaging point (right after the blocking allreduce),
never in the steps between.
"""

from typing import Callable, Optional

import torch
import torch.distributed as dist

from deepseek_ext.distributed._pipeline import (
    Counters,
    check_process_group,
    completed_future,
    ring_allreduce_bytes,
)
from deepseek_ext.distributed.allreduce_hook import CountingAllreduceState, counting_allreduce_hook

__all__ = ["AdaptiveLocalSGD", "adaptive_local_sgd_hook"]


class AdaptiveLocalSGD:
    """Adaptive local SGD for a DDP model.

    Usage (one object per model, created on every rank)::

        local_sgd = AdaptiveLocalSGD(ddp_model.module, warmup_steps=100, min_period=2, max_period=32)
        ddp_model.register_comm_hook(local_sgd, adaptive_local_sgd_hook)
        for batch in data:
            loss = loss_fn(ddp_model(batch)); loss.backward()
            optimizer.step(); optimizer.zero_grad()
            local_sgd.step()           # after every optimizer step

    Args:
        module: the model whose parameters are averaged (``ddp_model.module``).
        process_group: the group DDP uses (default WORLD); gloo or nccl. Bound
            when built if ``torch.distributed`` is initialised, else on first
            use, so the object can be built before ``init_process_group``.
        warmup_steps: steps synchronised every step by DDP before local SGD.
        min_period, max_period: bounds of the averaging period (steps).
        initial_period: first period after warm-up (default ``min_period``).
        grow_below, shrink_above: drift thresholds (see the module docstring).
        inner_state, inner_hook: the DDP hook used during warm-up (default a
            counted plain allreduce; e.g. an :class:`Int8CompressionState` and
            :func:`int8_compress_hook`).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        process_group: Optional[dist.ProcessGroup] = None,
        warmup_steps: int = 100,
        min_period: int = 2,
        max_period: int = 32,
        initial_period: Optional[int] = None,
        grow_below: float = 0.5,
        shrink_above: float = 2.0,
        inner_state=None,
        inner_hook: Optional[Callable] = None,
    ):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not isinstance(min_period, int) or min_period < 1:
            raise ValueError(f"min_period must be an int >= 1, got {min_period!r}")
        if not isinstance(max_period, int) or max_period < min_period:
            raise ValueError(f"max_period must be an int >= min_period ({min_period}), got {max_period!r}")
        initial_period = min_period if initial_period is None else initial_period
        if not min_period <= initial_period <= max_period:
            raise ValueError(f"initial_period must be in [min_period, max_period] = [{min_period}, {max_period}], "
                             f"got {initial_period!r}")
        if not 0 <= grow_below <= shrink_above:
            raise ValueError(f"need 0 <= grow_below <= shrink_above, got {grow_below} and {shrink_above}")
        if (inner_state is None) != (inner_hook is None):
            raise ValueError("inner_state and inner_hook go together: give both or neither")
        self._requested_group = process_group
        self.process_group, self.world_size = None, None
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.warmup_steps = warmup_steps
        self.min_period, self.max_period = min_period, max_period
        self.period = initial_period
        self.grow_below, self.shrink_above = grow_below, shrink_above
        if inner_hook is None:
            inner_state, inner_hook = CountingAllreduceState(process_group), counting_allreduce_hook
        self.inner_state, self.inner_hook = inner_state, inner_hook
        self.step_count = 0
        self.last_average = 0
        self.history = []  # (step, drift, new period) at each averaging point
        self._anchor = None
        self._counters = Counters()
        if dist.is_available() and dist.is_initialized():  # else on first use (before init_process_group)
            self._ensure_bound()

    def _ensure_bound(self) -> None:
        if self.process_group is None:
            self.process_group = check_process_group(self._requested_group, "AdaptiveLocalSGD")
            self.world_size = self.process_group.size()

    @property
    def local(self) -> bool:
        """True once warm-up is over (the hook then sends nothing)."""
        return self.step_count >= self.warmup_steps

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def step(self) -> bool:
        """Call after each optimizer step. Returns True when it averaged the
        parameters at this step (a blocking allreduce); otherwise it does no
        communication and no host synchronisation."""
        self.step_count += 1
        if self.step_count < self.warmup_steps:
            return False
        if self.step_count == self.warmup_steps or self._anchor is None:
            self._anchor = self._flat()  # the ranks agree here (DDP synchronised every step)
            self.last_average = self.step_count
            return False
        if self.step_count - self.last_average < self.period:
            return False
        self._average()
        return True

    def _average(self) -> None:
        self._ensure_bound()
        n = self._anchor.numel()
        buf = torch.empty(n + 1, dtype=torch.float32, device=self._anchor.device)
        torch.sub(self._flat(), self._anchor, out=buf[:n])
        buf[n] = buf[:n].square().sum()
        dist.all_reduce(buf, group=self.process_group)
        mean = buf[:n].div_(self.world_size)
        signal = mean.square().sum()
        noise = buf[n] / self.world_size - signal
        drift = float((noise.clamp_min(0) / signal.clamp_min(torch.finfo(torch.float32).tiny)).item())
        self._anchor += mean
        offset = 0
        for p in self.params:
            k = p.numel()
            p.copy_(self._anchor[offset: offset + k].view_as(p))
            offset += k
        if drift < self.grow_below:
            self.period = min(2 * self.period, self.max_period)
        elif drift > self.shrink_above:
            self.period = max(self.period // 2, self.min_period)
        self.history.append((self.step_count, drift, self.period))
        self.last_average = self.step_count
        sent = ring_allreduce_bytes(n + 1, self.world_size, 4)
        self._counters.add(allreduce_calls=1, bytes_sent=sent, bytes_sent_inter_node=sent, bytes_fp32_equivalent=sent)

    def stats(self) -> dict:
        """Bytes of the parameter averages plus those of the warm-up hook
        (same keys as :meth:`Int8CompressionState.stats`), ``period``,
        ``averages`` and ``step``."""
        own, inner = self._counters.snapshot(), self.inner_state.stats()
        out = {k: own[k] + inner.get(k, 0) for k in ("hook_calls", "allreduce_calls", "bytes_sent",
                                                   "bytes_sent_inter_node", "bytes_fp32_equivalent",
                                                   "hook_time_s")}
        out["compression_ratio"] = out["bytes_fp32_equivalent"] / out["bytes_sent"] if out["bytes_sent"] else 1.0
        out.update(period=self.period, averages=len(self.history), step=self.step_count)
        return out

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "last_average": self.last_average, "period": self.period,
                "history": list(self.history), "anchor": None if self._anchor is None else self._anchor.clone(),
                "counters": self._counters.snapshot(), "inner": self.inner_state.state_dict()}

    def load_state_dict(self, state_dict: dict, process_group: Optional[dist.ProcessGroup] = None) -> None:
        if process_group is not None:
            self._requested_group, self.process_group = process_group, None
            self._ensure_bound()
        self.step_count, self.last_average = int(state_dict["step_count"]), int(state_dict["last_average"])
        self.period, self.history = int(state_dict["period"]), list(state_dict["history"])
        anchor = state_dict["anchor"]
        self._anchor = None if anchor is None else anchor.clone()
        self._counters.load(state_dict["counters"])
        self.inner_state.load_state_dict(state_dict["inner"], process_group)


def adaptive_local_sgd_hook(state: AdaptiveLocalSGD, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP hook of :class:`AdaptiveLocalSGD`: the inner hook during warm-up,
    then the local gradient unchanged (no communication)."""
    if not state.local:
        return state.inner_hook(state.inner_state, bucket)
    return completed_future(bucket.buffer())
