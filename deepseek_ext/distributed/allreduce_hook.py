"""DDP's default averaging allreduce as a communication hook that counts what it
sends like :mod:`.int8_hook` does: the like-for-like baseline of the benchmarks."""

import time
from typing import Optional

import torch
import torch.distributed as dist

from deepseek_ext.distributed._pipeline import Counters, check_process_group, completed_future, ring_allreduce_bytes

__all__ = ["CountingAllreduceState", "counting_allreduce_hook"]


def allreduce_mean(buffer: torch.Tensor, group) -> torch.futures.Future:
    buffer.div_(group.size())
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class CountingAllreduceState:
    """State of :func:`counting_allreduce_hook`: DDP's default full-precision
    averaging allreduce, counting bytes like :class:`Int8CompressionState`
    (a ring allreduce sends ``2 * N * (p - 1) / p`` elements per rank), with
    the same :meth:`stats` keys. Binds its process group when built if
    ``torch.distributed`` is initialised, else on first use."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None):
        self._requested_group = process_group
        self.process_group, self.world_size = None, None
        self.iteration = 0
        self._counters = Counters()
        if dist.is_available() and dist.is_initialized():  # else on first use
            self._ensure_bound()

    def _ensure_bound(self) -> None:
        if self.process_group is None:
            self.process_group = check_process_group(self._requested_group, "CountingAllreduceState")
            self.world_size = self.process_group.size()

    def stats(self) -> dict:
        out = self._counters.snapshot()
        out["iteration"] = self.iteration
        return out

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "counters": self._counters.snapshot()}

    def load_state_dict(self, state_dict: dict, process_group: Optional[dist.ProcessGroup] = None) -> None:
        if process_group is not None:
            self._requested_group, self.process_group = process_group, None
            self._ensure_bound()
        self.iteration = int(state_dict["iteration"])
        self._counters.load(state_dict["counters"])


def counting_allreduce_hook(state: CountingAllreduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Plain averaging allreduce (what DDP does without a hook), counted."""
    t0 = time.perf_counter()
    state._ensure_bound()
    buffer = bucket.buffer()
    if bucket.is_last():
        state.iteration += 1
    n, p = buffer.numel(), state.world_size
    sent = ring_allreduce_bytes(n, p, buffer.element_size())
    fut = allreduce_mean(buffer, state.process_group) if p > 1 else completed_future(buffer)
    state._counters.add(hook_calls=1, allreduce_calls=1, bytes_sent=sent, bytes_sent_inter_node=sent,
                        bytes_fp32_equivalent=ring_allreduce_bytes(n, p, 4),
                        hook_time_s=time.perf_counter() - t0)
    return fut
