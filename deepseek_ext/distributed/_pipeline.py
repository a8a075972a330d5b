"""Plumbing shared by the communication hooks: ordered launches, counters.

Nothing here knows about quantisation; :mod:`.int8_hook` builds its hook
from these pieces.
"""

import threading
import time

import torch
import torch.distributed as dist

SUPPORTED_BACKENDS = ("gloo", "nccl")


def ring_allreduce_bytes(numel: int, world_size: int, element_size: int) -> int:
    """Bytes one rank sends in a ring allreduce of ``numel`` elements:
    ``2 * numel * (p - 1) / p * element_size`` (reduce-scatter + all-gather)."""
    if world_size <= 1:
        return 0
    return (2 * numel * (world_size - 1) * element_size) // world_size


def check_process_group(process_group, who: str):
    """The group to use (``WORLD`` for None), after checking its backend."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who} needs an initialised default process group "
                           "(call torch.distributed.init_process_group first)")
    group = process_group if process_group is not None else dist.group.WORLD
    backend = str(dist.get_backend(group)).lower()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"process_group backend must be one of {SUPPORTED_BACKENDS}, got {backend!r}")
    return group


def completed_future(value: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future(devices=[value.device] if value.is_cuda else None)
    fut.set_result(value)
    return fut


class Counters:
    """Byte and call counters kept as Python numbers (never tensors), so that
    reading them costs no device synchronisation. Callbacks run on the
    process group's threads, hence the lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values = {"hook_calls": 0, "compressed_calls": 0, "allreduce_calls": 0, "bytes_sent": 0,
                       "bytes_sent_inter_node": 0, "bytes_fp32_equivalent": 0, "hook_time_s": 0.0,
                       "policy_allreduce_calls": 0}

    def add(self, **deltas):
        with self._lock:
            for k, v in deltas.items():
                self.values[k] += v

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self.values)
        sent = out["bytes_sent"]
        # fp32-allreduce bytes over our bytes: 1.0 for a plain fp32 allreduce, ~3.9 for int8.
        out["compression_ratio"] = out["bytes_fp32_equivalent"] / sent if sent else 1.0
        return out

    def load(self, values: dict):
        with self._lock:
            for k in self.values:
                if k in values:
                    self.values[k] = type(self.values[k])(values[k])


class FutureJoin:
    """One future for several parts of a tensor, completed without waiting.

    Each part's callback writes its share of ``value`` and calls :meth:`done`
    (or :meth:`fail`); the last :meth:`done` completes :attr:`result` with
    ``value``; the first :meth:`fail` fails it (raised from a then-callback,
    so that DDP reports the error as is). On CUDA, callbacks run on different
    streams: each records an event after its writes and the last makes its
    stream wait for all of them (a device-side wait, not a host one) before
    completing, so that the result's consumers see every part.
    """

    def __init__(self, parts: int, value: torch.Tensor):
        self._lock = threading.Lock()
        self._left, self._value, self._events, self._failed = parts, value, [], False
        self._inner = torch.futures.Future(devices=[value.device] if value.is_cuda else None)
        self.result = self._inner.then(lambda f: f.value())

    def done(self) -> None:
        with self._lock:
            if self._value.is_cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self._value.device))
                self._events.append(event)
            self._left -= 1
            last = self._left == 0 and not self._failed
        if last:
            if self._value.is_cuda:
                stream = torch.cuda.current_stream(self._value.device)
                for event in self._events:
                    stream.wait_event(event)
            self._inner.set_result(self._value)

    def fail(self, err: BaseException) -> None:
        with self._lock:
            if self._failed:
                return
            self._failed = True
        self._inner.set_exception(err)


class HostTimer:
    """Adds the host time of a block to ``counters['hook_time_s']``."""

    def __init__(self, counters: Counters):
        self.counters = counters

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.counters.add(hook_time_s=time.perf_counter() - self.t0)
        return False


class OrderedLauncher:
    """Launches the collectives of one pipeline stage in bucket order.

    Stage ``k > 0`` of bucket ``s`` starts from the callback of stage ``k - 1``,
    on whichever thread completed that collective (Gloo runs several), so two
    ranks could reach the launches of two buckets in different orders and
    pair the wrong collectives. Each stage has its own process group and this
    launcher: a launch for sequence number ``s`` waits (without blocking any
    thread: it is parked and run by whoever launches ``s - 1``) until every
    smaller number has been launched or skipped.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._next = 0
        self._ready = {}

    def submit(self, seq: int, launch) -> None:
        with self._lock:
            self._ready[seq] = launch
            while self._next in self._ready:
                fn = self._ready.pop(self._next)
                self._next += 1
                fn()

    def skip(self, seq: int) -> None:
        self.submit(seq, lambda: None)
