"""Background prefetch of batches onto the training device."""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterable

import torch


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class _Done:
    pass


class _Failed:
    def __init__(self, exc):
        self.exc = exc


class Prefetcher:
    """Iterates ``loader`` in a background thread, ``depth`` batches ahead, and
    yields every batch (tensors at any depth of tuples / lists / dicts) on ``device``.

    On CUDA the thread pins each tensor (unless the loader already did, e.g.
    ``pin_memory=True``), copies it with ``non_blocking=True`` on a side
    stream and records an event; the consumer's stream waits on that event (a
    device-side wait, the host never blocks on the copy) and the tensors are
    marked as used by the consumer's stream for the caching allocator. On CPU
    the thread only runs the loader ahead, so collation and worker results
    overlap the training step.

    ``wait_s`` accumulates the time the consumer spent blocked waiting for a
    batch (the data-wait of the loop); ``batches`` counts the batches yielded.
    """

    def __init__(self, loader: Iterable, device, depth: int = 2):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.depth = depth
        self.wait_s = 0.0
        self.batches = 0

    def __len__(self):
        return len(self.loader)

    def _produce(self, q: queue.Queue, stop: threading.Event):
        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device)

                def to_device(t):
                    if t.device.type == "cpu" and not t.is_pinned():
                        t = t.pin_memory()
                    return t.to(self.device, non_blocking=True)
            for batch in self.loader:
                if stop.is_set():
                    return
                if cuda:
                    with torch.cuda.stream(stream):
                        batch = _map_tensors(batch, to_device)
                        event = torch.cuda.Event()
                        event.record(stream)
                    item = (batch, event)
                else:
                    item = (_map_tensors(batch, lambda t: t.to(self.device)), None)
                if not put(item):
                    return
            put(_Done())
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failed(e))

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(q, stop), daemon=True,
                                  name="deepseek_ext-prefetch")
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_s += time.perf_counter() - t0
                if isinstance(item, _Done):
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    _map_tensors(batch, lambda t: t.record_stream(current))
                self.batches += 1
                yield batch
        finally:
            stop.set()
            thread.join(timeout=5)
